"""Hostile image inputs: shapes that would blow up memory, decoding workers that die."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import fgh_deploy as fgh
from fgh_deploy import images as images_module
from fgh_deploy.config import PreprocessConfig
from fgh_deploy.encode import encode_folder
from fgh_deploy.engines import load_engine
from fgh_deploy.errors import FghError
from fgh_deploy.images import (
    MAX_FULL_RESIZE_RATIO,
    ImageBatchLoader,
    load_image,
    long_side_crop_box,
    read_plain_jpeg,
)
from fgh_deploy.index import CodeIndex
from fgh_deploy.query import search_images

SMALL = PreprocessConfig(input_size=32, resize_size=36)
DEFAULT = PreprocessConfig()


def _noise_png(path: Path, width: int, height: int, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _whole_image_resize(path: Path, cfg: PreprocessConfig) -> torch.Tensor:
    """The path every image took before: resize the whole short side, then crop."""
    return images_module._resize_crop(TF.pil_to_tensor(images_module.decode_image(path)), cfg)


# --------------------------------------------------------------------------- aspect-ratio bombs


@pytest.mark.parametrize("size", [(40, 30), (30, 40), (144, 36), (36, 144), (500, 200)])
def test_ordinary_aspect_ratios_resize_the_whole_image(tmp_path: Path, size: tuple[int, int]) -> None:
    # Up to MAX_FULL_RESIZE_RATIO (144 x 36 is exactly 4:1 at resize 36) nothing changed.
    path = _noise_png(tmp_path / "n.png", *size)
    assert long_side_crop_box(*size, SMALL) is None
    assert torch.equal(load_image(path, SMALL), _whole_image_resize(path, SMALL))


@pytest.mark.parametrize("size", [(2000, 3), (3, 2000), (100, 1), (1, 100), (1001, 13), (13, 1001), (145, 36)])
def test_extreme_aspect_ratios_match_the_whole_image_resize(tmp_path: Path, size: tuple[int, int]) -> None:
    # Small enough for the old whole-image resize to run; only the long side's crop is resampled
    # now (by Pillow, whose bilinear filter agrees with torchvision's to within one grey level).
    path = _noise_png(tmp_path / "n.png", *size, seed=sum(size))
    assert long_side_crop_box(*size, SMALL) is not None
    out = load_image(path, SMALL)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    assert (out.int() - _whole_image_resize(path, SMALL).int()).abs().max() <= 1


@pytest.mark.parametrize("size", [(20000, 1), (60000, 1), (1, 200000)])
def test_crop_box_keeps_only_what_survives_the_crop(size: tuple[int, int]) -> None:
    width, height = size
    left, top, right, bottom = long_side_crop_box(width, height, DEFAULT)
    start, end, long = (left, right, width) if width > height else (top, bottom, height)
    assert (left, top, right, bottom)[1 if width > height else 0] == 0.0
    assert (right, bottom)[0 if width < height else 1] == min(size)  # the whole short side
    # 224 of the 256 * long resized pixels, centred: under one source pixel, at the middle.
    assert end - start == pytest.approx(224 / 256)
    assert start < long / 2 < end


def test_aspect_ratio_bombs_load_in_bounded_memory(tmp_path: Path) -> None:
    # Black images with a coloured middle: 141-byte-class PNGs that the whole-image resize
    # turned into 5-50 million pixel intermediates (GBs). Measured in a child process (torch
    # allocations are invisible to tracemalloc): the peak RSS may grow by at most 150 MB.
    for width, height in [(20000, 1), (60000, 1), (1, 200000)]:
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        if width > height:
            pixels[:, width // 2 - 5: width // 2 + 5] = (200, 100, 50)
        else:
            pixels[height // 2 - 5: height // 2 + 5, :] = (200, 100, 50)
        Image.fromarray(pixels).save(tmp_path / f"{width}x{height}.png", optimize=True)
    _noise_png(tmp_path / "warmup.png", 300, 200)
    script = textwrap.dedent("""
        import resource, sys
        from pathlib import Path
        import torch
        from fgh_deploy.config import PreprocessConfig
        from fgh_deploy.images import load_image
        torch.set_num_threads(1)
        folder, cfg = Path(sys.argv[1]), PreprocessConfig()
        load_image(folder / "warmup.png", cfg)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for name in ["20000x1.png", "60000x1.png", "1x200000.png"]:
            out = load_image(folder / name, cfg)
            assert out.shape == (3, 224, 224), out.shape
            assert (out == torch.tensor([200, 100, 50], dtype=torch.uint8).view(3, 1, 1)).all(), name
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 150, f"peak RSS grew by {done.stdout.strip()} MB"


def test_device_path_leaves_extreme_aspect_ratios_to_pillow(tmp_path: Path) -> None:
    # The device decoder resizes whole images, so such JPEGs go the bounded Pillow way.
    extreme = (MAX_FULL_RESIZE_RATIO + 1) * 8
    Image.new("RGB", (extreme, 8), (10, 20, 30)).save(tmp_path / "wide.jpg")
    Image.new("RGB", (16, 8), (10, 20, 30)).save(tmp_path / "plain.jpg")
    cfg = PreprocessConfig(input_size=8, resize_size=8)
    assert read_plain_jpeg(tmp_path / "wide.jpg") is not None
    assert read_plain_jpeg(tmp_path / "wide.jpg", cfg) is None
    assert read_plain_jpeg(tmp_path / "plain.jpg", cfg) is not None
    loader = ImageBatchLoader(["wide.jpg", "plain.jpg"], cfg, root=tmp_path, jpeg_device="cpu")
    (batch,) = list(loader)
    assert batch.indices == [0, 1] and batch.failures == []
    assert torch.equal(batch.images[0], load_image(tmp_path / "wide.jpg", cfg))


# --------------------------------------------------------------------------- dead decoding workers


def test_worker_killed_by_a_signal_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("a.png", "b.png", "dies.png"):
        _noise_png(tmp_path / name, 40, 30)
    load_timed = images_module._load_timed

    def load_or_die(index: int, path: str, cfg: PreprocessConfig) -> object:
        if path.endswith("dies.png"):
            os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer would
        return load_timed(index, path, cfg)

    # Forked workers inherit the patched module.
    monkeypatch.setattr(images_module, "_load_timed", load_or_die)
    loader = ImageBatchLoader(["a.png", "b.png", "dies.png"], SMALL, root=tmp_path, batch_size=1,
                              num_workers=1, multiprocessing_context="fork")
    with pytest.raises(FghError) as info:
        for _ in loader:
            pass
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("image decoding worker (pid ")
    assert "was killed by signal SIGKILL: often the out-of-memory killer" in message
    assert f"(pid {os.getpid()})" not in message  # the worker's pid, not ours


# --------------------------------------------------------------------------- query batching


def test_query_images_are_encoded_in_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = fgh.save_checkpoint(fgh.build_model("adsh", 16, backbone="resnet18", input_size=32),
                                tmp_path / "adsh16.pt")
    folder = tmp_path / "images"
    folder.mkdir()
    shapes = [(40, 30), (30, 40), (64, 64), (500, 20), (20, 500), (50, 45)]  # two extreme ratios
    for n, shape in enumerate(shapes):
        _noise_png(folder / f"{n}.png", *shape, seed=n)
    queries = [folder / f"{n % len(shapes)}.png" for n in range(11)]
    with load_engine(model, device="cpu") as engine:
        encode_folder(folder, engine, tmp_path / "idx", progress=False, workers=0)
        index = CodeIndex.open(tmp_path / "idx")
        one_by_one = [search_images(index, engine, [query], top_k=4)[0] for query in queries]
        encode = engine.encode
        batch_sizes = []

        def counting_encode(images: torch.Tensor) -> np.ndarray:
            batch_sizes.append(len(images))
            return encode(images)

        monkeypatch.setattr(engine, "encode", counting_encode)
        batched = search_images(index, engine, queries, top_k=4, batch_size=4)
        assert batch_sizes == [4, 4, 3]
        assert [r.query for r in batched] == [str(q) for q in queries]
        assert [r.to_dict() for r in batched] == [r.to_dict() for r in one_by_one]
        assert all(r.hits[0].distance == 0 for r in batched)  # each query is in the index
        with pytest.raises(FghError, match="batch_size must be at least 1"):
            search_images(index, engine, queries, batch_size=0)
        # A query that cannot be decoded, in a later batch, is still named in one line.
        (folder / "text.png").write_text("not an image")
        with pytest.raises(FghError, match=r"text\.png: not an image") as info:
            search_images(index, engine, [*queries, folder / "text.png"], batch_size=4)
        assert "\n" not in str(info.value)
        index.close()


def test_workers_decode_in_process_when_shared_memory_cannot_hold_their_batches(
        caplog: pytest.LogCaptureFixture) -> None:
    assert images_module.shared_memory_workers(2, 1) == 2
    with caplog.at_level("WARNING", logger="fgh_deploy.images"):
        assert images_module.shared_memory_workers(2, 1 << 50) == 0
    assert "decoding in this process instead" in caplog.text and "--shm-size" in caplog.text


def _can_mount_a_private_tmpfs() -> bool:
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /dev/shm"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(sys.platform != "linux" or not _can_mount_a_private_tmpfs(),
                    reason="needs `unshare -m` and mount (root on Linux) to give one process a 64 KB /dev/shm")
def test_encode_in_a_container_with_a_tiny_dev_shm_finishes_instead_of_hanging(tmp_path: Path) -> None:
    """A full /dev/shm used to hang `fgh encode --workers 2` forever (a worker cannot hand its batch over)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    torch.manual_seed(0)
    checkpoint = fgh.save_checkpoint(fgh.build_model("adsh", 8, backbone="resnet18", input_size=32), tmp_path / "m.pt")
    index = tmp_path / "index"
    command = (f"mount -t tmpfs -o size=64k tmpfs /dev/shm && exec {sys.executable} -m fgh_deploy.cli encode "
               f"{folder} --engine {checkpoint} --out {index} --workers 2 --batch-size 4 --json")
    result = subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "/dev/shm has 0.1 MB free" in result.stderr and "Traceback" not in result.stderr
    with CodeIndex.open(index) as opened:
        assert len(opened) == 6
