"""Tests for fgh_deploy.images: decoding, preprocessing, listing and the batch loader."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import struct
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torchvision.transforms.v2 import functional as TF

from fgh_deploy import images as images_module
from fgh_deploy.config import PreprocessConfig
from fgh_deploy.errors import FghError
from fgh_deploy.images import (
    IMAGE_EXTENSIONS,
    LINK_NOT_FOLLOWED,
    DecodeFailure,
    ImageBatchLoader,
    ImageDecodeError,
    ImageScan,
    decode_image,
    decode_jpegs,
    has_image_extension,
    list_images,
    load_image,
    read_plain_jpeg,
    scan_images,
)

SMALL = PreprocessConfig(input_size=32, resize_size=36)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _solid(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 30), **save_args) -> Path:
    Image.new("RGB", size, color).save(path, **save_args)
    return path


def _assert_close(actual: tuple[int, ...], expected: tuple[int, ...], tol: int = 12) -> None:
    assert all(abs(a - e) <= tol for a, e in zip(actual, expected)), (actual, expected)


# --------------------------------------------------------------------------- decode_image


@pytest.mark.parametrize("ext", ["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"])
def test_decode_formats(tmp_path: Path, ext: str) -> None:
    path = _solid(tmp_path / f"img.{ext}", (200, 40, 60), size=(48, 32))
    img = decode_image(path)
    assert img.mode == "RGB"
    assert img.size == (48, 32)
    _assert_close(img.getpixel((24, 16)), (200, 40, 60), tol=20)  # GIF quantises colours


def test_decode_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (20, 20), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 3
    _assert_close(decode_image(path).getpixel((10, 10)), (255, 0, 0))


def test_decode_grayscale(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    Image.new("L", (10, 10), 77).save(path)
    img = decode_image(path)
    assert img.mode == "RGB"
    assert img.getpixel((5, 5)) == (77, 77, 77)


def test_decode_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    img = decode_image(path)
    assert img.mode == "RGB"
    _assert_close(img.getpixel((8, 8)), (255, 0, 0))


def test_decode_palette_png(tmp_path: Path) -> None:
    path = tmp_path / "pal.png"
    Image.new("RGB", (10, 10), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(path)
    assert Image.open(path).mode == "P"
    _assert_close(decode_image(path).getpixel((3, 3)), (10, 200, 30))


def test_decode_rgba_composites_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (20, 10), (0, 0, 0, 0))  # transparent black background
    rgba.paste((0, 0, 255, 255), (0, 0, 10, 10))  # opaque blue left half
    rgba.paste((255, 0, 0, 128), (10, 0, 20, 5))  # half-transparent red, top right
    path = tmp_path / "alpha.png"
    rgba.save(path)
    img = decode_image(path)
    assert img.getpixel((5, 5)) == (0, 0, 255)
    assert img.getpixel((15, 8)) == (255, 255, 255)  # white, not black
    _assert_close(img.getpixel((15, 2)), (255, 127, 127), tol=2)


@pytest.mark.parametrize("mode", ["LA", "P"])
def test_decode_other_transparency_on_white(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"t_{mode}.png"
    if mode == "LA":
        Image.new("LA", (8, 8), (0, 0)).save(path)
    else:
        pal = Image.new("P", (8, 8), 0)
        pal.putpalette([0, 0, 0, 255, 0, 0])
        pal.save(path, transparency=0)
    assert decode_image(path).getpixel((4, 4)) == (255, 255, 255)


def test_decode_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    levels = np.array([[0, 257 * 64, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    path = tmp_path / "deep.png"
    Image.fromarray(levels).save(path)
    assert Image.open(path).mode == "I;16"
    row = np.asarray(decode_image(path))[0]
    assert row[:, 0].tolist() == [0, 64, 128, 255]
    assert (row == row[:, :1]).all()  # gray: equal channels


def test_decode_applies_exif_orientation(tmp_path: Path) -> None:
    # 40x20, red left half; orientation 6 means "rotate 90° clockwise to display".
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    out = decode_image(path)
    assert out.size == (20, 40)  # aspect flipped
    _assert_close(out.getpixel((10, 5)), (255, 0, 0), tol=30)  # left half moved to the top
    _assert_close(out.getpixel((10, 35)), (0, 0, 255), tol=30)
    # Same in the tensor pipeline: the centre crop keeps rows 10..29 of the upright image.
    tensor = load_image(path, PreprocessConfig(input_size=20, resize_size=20))
    _assert_close(tuple(tensor[:, 3, 10].tolist()), (255, 0, 0), tol=30)
    _assert_close(tuple(tensor[:, 16, 10].tolist()), (0, 0, 255), tol=30)


def test_decode_jpeg_draft_keeps_short_side(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    _noise(2000, 1500).save(path, quality=80)
    assert decode_image(path).size == (2000, 1500)
    assert decode_image(path, min_size=256).size == (500, 375)  # 1/4 scale, short side >= 256
    odd = tmp_path / "odd.jpg"
    _noise(1030, 515).save(odd)
    small = decode_image(odd, min_size=256)
    assert min(small.size) >= 256 and small.size[0] < 1030
    with pytest.raises(ValueError, match="min_size"):
        decode_image(odd, min_size=0)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_decode_refuses_huge_header(tmp_path: Path) -> None:
    path = _png_header_only(tmp_path / "big.png", 20000, 20000)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(path)
    limit = 2 * Image.MAX_IMAGE_PIXELS
    assert str(info.value) == (
        f"{path}: refused: 400000000 pixels exceeds the {limit} limit (decompression bomb)"
    )


def test_decode_refuses_warning_threshold_without_global_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _solid(tmp_path / "medium.png", (1, 2, 3), size=(40, 40))  # 1600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow would only warn at 1600
    filters_before = list(warnings.filters)
    with pytest.raises(ImageDecodeError, match="1600 pixels exceeds the 1000 limit"):
        decode_image(path)
    assert warnings.filters == filters_before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decode_truncated_jpeg(tmp_path: Path) -> None:
    full = tmp_path / "full.jpg"
    _noise(256, 256).save(full, quality=90)
    path = tmp_path / "x.jpg"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImageDecodeError) as info:
        decode_image(path)
    assert str(info.value) == f"{path}: truncated image"


def test_decode_truncated_png(tmp_path: Path) -> None:
    full = tmp_path / "full.png"
    _noise(128, 128).save(full)
    path = tmp_path / "cut.png"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImageDecodeError, match="truncated image"):
        decode_image(path)


def test_decode_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.touch()
    with pytest.raises(ImageDecodeError) as info:
        decode_image(path)
    assert str(info.value) == f"{path}: empty file (0 bytes)"


def test_decode_text_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.jpg"
    path.write_text("this is not a JPEG\n")
    with pytest.raises(ImageDecodeError) as info:
        decode_image(path)
    assert str(info.value) == f"{path}: not an image (cannot identify image file)"
    assert isinstance(info.value, FghError)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read mode-000 files")
def test_decode_unreadable_file(tmp_path: Path) -> None:
    path = _solid(tmp_path / "locked.jpg", (1, 2, 3))
    path.chmod(0)
    try:
        with pytest.raises(ImageDecodeError) as info:
            decode_image(path)
    finally:
        path.chmod(0o644)
    assert str(info.value) == f"{path}: permission denied"


def test_decode_permission_error_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs as root too: simulate the EACCES that open() raises for a mode-000 file.
    path = _solid(tmp_path / "locked.jpg", (1, 2, 3))

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images_module, "open", denied, raising=False)
    with pytest.raises(ImageDecodeError, match=r"locked\.jpg: permission denied$"):
        decode_image(path)


def test_decode_missing_broken_link_directory(tmp_path: Path) -> None:
    link = tmp_path / "link.jpg"
    link.symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(ImageDecodeError, match=r"link\.jpg: broken symlink$"):
        decode_image(link)
    with pytest.raises(ImageDecodeError, match=r"gone\.jpg: no such file$"):
        decode_image(tmp_path / "gone.jpg")
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageDecodeError, match=r"dir\.jpg: is a directory$"):
        decode_image(tmp_path / "dir.jpg")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_decode_fifo_does_not_block(tmp_path: Path) -> None:
    path = tmp_path / "pipe.jpg"
    os.mkfifo(path)
    with pytest.raises(ImageDecodeError, match="not a regular file"):
        decode_image(path)


def test_decode_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(ImageDecodeError("a/b.jpg", "truncated image")))
    assert (str(err), err.path, err.reason) == ("a/b.jpg: truncated image", "a/b.jpg", "truncated image")


# --------------------------------------------------------------------------- load_image


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (64, 64), (1000, 50), (17, 23), (1, 1)])
@pytest.mark.parametrize("cfg", [SMALL, PreprocessConfig(), PreprocessConfig(input_size=64, resize_size=64)])
def test_load_image_shape_and_dtype(tmp_path: Path, size: tuple[int, int], cfg: PreprocessConfig) -> None:
    path = tmp_path / "img.png"
    _noise(*size).save(path)
    out = load_image(path, cfg)
    assert out.dtype == torch.uint8
    assert out.shape == (3, cfg.input_size, cfg.input_size)


def test_load_image_matches_torchvision_pipeline(tmp_path: Path) -> None:
    path = tmp_path / "img.png"
    src = _noise(120, 90)
    src.save(path)
    cfg = PreprocessConfig(input_size=48, resize_size=56, interpolation="bicubic")
    expected = TF.pil_to_tensor(src)
    expected = TF.resize(expected, [56], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    expected = TF.center_crop(expected, [48, 48])
    assert torch.equal(load_image(path, cfg), expected)


def test_load_image_solid_colour_survives(tmp_path: Path) -> None:
    path = _solid(tmp_path / "c.png", (10, 120, 250), size=(90, 60))
    out = load_image(path, SMALL)
    assert out[:, 16, 16].tolist() == [10, 120, 250]


def test_load_image_rejects_pil_only_interpolation(tmp_path: Path) -> None:
    path = _solid(tmp_path / "c.png", (1, 2, 3))
    with pytest.raises(FghError, match="interpolation 'lanczos'"):
        load_image(path, PreprocessConfig(interpolation="lanczos"))


# --------------------------------------------------------------------------- list_images


def test_image_extensions() -> None:
    assert set(IMAGE_EXTENSIONS) == {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
    assert has_image_extension("A/B.JPG") and has_image_extension("x.TiFf")
    assert not has_image_extension("x.txt") and not has_image_extension("jpg")


def test_list_images_walks_filters_and_sorts(tmp_path: Path) -> None:
    for rel in ["b/2.PNG", "b/1.jpg", "a.JPEG", "c/d/e.webp", "c/x.gif", "top.bmp", "t.TIF", "u.tiff"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("no")
    (tmp_path / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "thumb.jpg").write_bytes(b"x")
    (tmp_path / "folder.jpg").mkdir()  # a directory is not an image, but walked as a folder
    (tmp_path / "folder.jpg" / "in.png").write_bytes(b"x")
    assert list_images(tmp_path) == [
        "a.JPEG", "b/1.jpg", "b/2.PNG", "c/d/e.webp", "c/x.gif", "folder.jpg/in.png", "t.TIF", "top.bmp", "u.tiff",
    ]  # fmt: skip
    assert list_images(str(tmp_path)) == list_images(tmp_path)


def test_list_images_symlinks_and_loops(tmp_path: Path) -> None:
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "real" / "sub" / "p.jpg").write_bytes(b"x")
    (tmp_path / "real" / "loop").symlink_to(tmp_path)  # loop back to the root
    (tmp_path / "real" / "sub" / "up").symlink_to("..")  # loop to the parent
    (tmp_path / "a_alias").symlink_to(tmp_path / "real")  # sorts first, yet the real path wins
    (tmp_path / "self.jpg").symlink_to("self.jpg")  # a link loop on itself
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "missing.jpg")
    (tmp_path / "file_link.png").symlink_to(tmp_path / "real" / "sub" / "p.jpg")
    outside = tmp_path.parent / f"{tmp_path.name}_outside"
    outside.mkdir()
    (outside / "o.png").write_bytes(b"x")
    (tmp_path / "ext").symlink_to(outside)  # only reachable through the link
    assert list_images(tmp_path, follow_links=True) == [
        "broken.jpg", "ext/o.png", "file_link.png", "real/sub/p.jpg", "self.jpg",
    ]  # fmt: skip
    # Not followed by default: each linked directory is reported instead.
    scan = scan_images(tmp_path)
    assert scan.paths == list_images(tmp_path) == ["broken.jpg", "file_link.png", "real/sub/p.jpg", "self.jpg"]
    assert scan.skipped == [
        ("a_alias", LINK_NOT_FOLLOWED), ("ext", LINK_NOT_FOLLOWED),
        ("real/loop", LINK_NOT_FOLLOWED), ("real/sub/up", LINK_NOT_FOLLOWED),
    ]  # fmt: skip
    assert scan_images(tmp_path, follow_links=True).skipped == []


def test_scan_images_does_not_walk_a_link_to_the_file_system_root(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "everything").symlink_to("/")
    assert scan_images(tmp_path) == ImageScan(["a.jpg"], [("everything", LINK_NOT_FOLLOWED)])


def test_scan_images_reports_special_files_without_opening_them(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")  # opening it would block the scan forever
    (tmp_path / "null.png").symlink_to(os.devnull)  # a symlinked file whose target is a device
    (tmp_path / "pipe_link.jpg").symlink_to(tmp_path / "pipe.jpg")
    (tmp_path / "notes.fifo").symlink_to(tmp_path / "pipe.jpg")  # no image extension: not mentioned
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "s.webp"))
    except OSError:
        sock.close()
        sock = None  # path too long for AF_UNIX on this machine: the other kinds still run
    (tmp_path / "album.jpg").mkdir()  # a folder named like an image is walked as a folder
    (tmp_path / "album.jpg" / "in.png").write_bytes(b"x")
    try:
        scan = scan_images(tmp_path)
    finally:
        if sock is not None:
            sock.close()
    assert scan.paths == ["album.jpg/in.png"]
    expected = [
        ("null.png", "not a regular file (character device)"),
        ("pipe.jpg", "not a regular file (FIFO)"),
        ("pipe_link.jpg", "not a regular file (FIFO)"),
    ]
    if sock is not None:
        expected.append(("s.webp", "not a regular file (socket)"))
    assert scan.skipped == expected


def test_scan_images_reports_over_long_paths(tmp_path: Path) -> None:
    path_max = os.pathconf(tmp_path, "PC_PATH_MAX")  # counts the terminating NUL
    name = "d" * 200
    (tmp_path / "ok.jpg").write_bytes(b"x")
    # Nest folders through directory fds (path-based calls refuse paths over PATH_MAX) until
    # one folder's path is too long; remember the deepest folder whose path still fits.
    fd = os.open(tmp_path, os.O_RDONLY)
    rel = fitting = ""
    while len(os.fsencode(os.path.join(tmp_path, rel))) < path_max:
        fitting = rel
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd, rel = child, f"{rel}/{name}" if rel else name
    os.close(fd)
    # In the deepest readable folder, a file whose own name tips its path over PATH_MAX.
    long_name = "f" * 246 + ".jpg"
    fd = os.open(tmp_path / fitting, os.O_RDONLY)
    os.close(os.open(long_name, os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    os.close(fd)
    too_long = "path too long for the file system (ENAMETOOLONG)"
    assert scan_images(tmp_path) == ImageScan(
        ["ok.jpg"], [(rel, f"folder skipped: {too_long}"), (f"{fitting}/{long_name}", too_long)]
    )


def test_list_images_non_utf8_name(tmp_path: Path) -> None:
    name = b"caf\xe9.jpg"
    try:
        _solid(Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), name))), (9, 9, 9))
    except (OSError, UnicodeError):
        pytest.skip("this file system does not accept non-UTF-8 names")
    (tmp_path / "cafe.jpg").write_bytes(b"x")
    (tmp_path / "caf\u00e9.jpg").write_bytes(b"x")  # valid UTF-8 "é" next to the Latin-1 byte
    listed = list_images(tmp_path)
    assert [os.fsencode(n) for n in listed] == sorted([b"cafe.jpg", b"caf\xc3\xa9.jpg", name])
    odd = next(n for n in listed if os.fsencode(n) == name)
    assert decode_image(os.path.join(tmp_path, odd)).size == (40, 30)  # the name round-trips
    with pytest.raises(ImageDecodeError) as info:
        decode_image(os.path.join(tmp_path, "missing_" + odd))
    assert "caf\\xe9.jpg: no such file" in str(info.value)
    str(info.value).encode("utf-8")  # printable: no lone surrogates in the message


def test_list_images_unreadable_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Simulated (root ignores directory permissions): an unreadable subfolder is skipped
    # with a warning, an unreadable root is an error.
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "a.jpg").write_bytes(b"x")
    (tmp_path / "ok.jpg").write_bytes(b"x")
    real_scandir = os.scandir

    def scandir(path: str) -> object:
        if os.path.basename(path) in ("locked", "root_locked"):
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert scan_images(tmp_path) == ImageScan(["ok.jpg"], [("locked", "folder skipped: permission denied")])
    assert "locked: permission denied, folder skipped" in caplog.text
    (tmp_path / "root_locked").mkdir()
    with pytest.raises(FghError, match="root_locked: permission denied$"):
        list_images(tmp_path / "root_locked")


def test_list_images_errors(tmp_path: Path) -> None:
    with pytest.raises(FghError, match="no such directory"):
        list_images(tmp_path / "nope")
    (tmp_path / "f.jpg").write_bytes(b"x")
    with pytest.raises(FghError, match="not a directory"):
        list_images(tmp_path / "f.jpg")
    (tmp_path / "empty").mkdir()
    assert list_images(tmp_path / "empty") == []


# --------------------------------------------------------------------------- ImageBatchLoader


def _colour(index: int) -> tuple[int, int, int]:
    return (index * 30 % 256, 255 - index * 20, 100)


def _loader_inputs(root: Path) -> tuple[list[str], dict[int, str]]:
    names, bad = [], {}
    for i in range(8):
        name = f"sub/{i:02d}.png"
        names.append(name)
        (root / "sub").mkdir(exist_ok=True)
        if i == 2:
            (root / name).write_text("not an image")
            bad[i] = "not an image (cannot identify image file)"
        elif i == 5:
            (root / name).touch()
            bad[i] = "empty file (0 bytes)"
        else:
            _solid(root / name, _colour(i), size=(50 + i * 7, 40))
    names.append("gone.jpg")
    bad[8] = "no such file"
    return names, bad


_START_METHODS = [(0, None), (2, "fork"), (2, "spawn")]


@pytest.mark.parametrize(("num_workers", "context"), _START_METHODS)
def test_batch_loader_reports_failures_and_keeps_order(
    tmp_path: Path, num_workers: int, context: str | None
) -> None:
    if context is not None and context not in multiprocessing.get_all_start_methods():
        pytest.skip(f"start method {context!r} not available on {sys.platform}")
    names, bad = _loader_inputs(tmp_path)
    loader = ImageBatchLoader(
        names, SMALL, root=tmp_path, batch_size=3, num_workers=num_workers, multiprocessing_context=context
    )
    assert len(loader) == 3
    seen, failures, batches = [], [], list(loader)
    for batch in batches:
        indices, images, batch_failures = batch
        assert images.dtype == torch.uint8 and images.shape == (len(indices), 3, 32, 32)
        for index, image in zip(indices, images):
            assert image[:, 16, 16].tolist() == list(_colour(index))
        seen.extend(indices)
        failures.extend(batch_failures)
    assert seen == [i for i in range(len(names)) if i not in bad]
    assert failures == [DecodeFailure(i, reason) for i, reason in sorted(bad.items())]
    assert all(type(f) is DecodeFailure for f in failures)


def test_batch_loader_all_failed_batch_and_pinning(tmp_path: Path) -> None:
    names = ["a.jpg", "b.jpg"]
    loader = ImageBatchLoader(names, SMALL, root=tmp_path, batch_size=4, pin_memory=True)
    (batch,) = list(loader)
    assert batch.indices == [] and batch.images.shape == (0, 3, 32, 32) and batch.images.dtype == torch.uint8
    assert [f.index for f in batch.failures] == [0, 1]


def test_batch_loader_absolute_paths_and_argument_checks(tmp_path: Path) -> None:
    paths = [str(_solid(tmp_path / f"{i}.jpg", _colour(i))) for i in range(3)]
    (batch,) = list(ImageBatchLoader(paths, SMALL, batch_size=8))
    assert batch.indices == [0, 1, 2] and batch.failures == []
    with pytest.raises(ValueError, match="batch_size"):
        ImageBatchLoader(paths, SMALL, batch_size=0)
    with pytest.raises(FghError, match="interpolation"):
        ImageBatchLoader(paths, PreprocessConfig(interpolation="box"))
    assert list(ImageBatchLoader([], SMALL)) == []


# --------------------------------------------------------------------------- JPEGs decoded on a device
# The CUDA path (nvJPEG) is the same code with device="cuda"; on CPU torchvision decodes with
# libjpeg-turbo, as Pillow does, so the two paths must agree pixel for pixel here.


@pytest.mark.parametrize("orientation", range(1, 9))
def test_device_decode_applies_exif_orientation_like_pillow(tmp_path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    _noise(48, 32, seed=orientation).save(path, exif=exif.tobytes(), quality=90)
    raw = read_plain_jpeg(path)
    assert raw is not None and raw.orientation == orientation
    (image,) = decode_jpegs([raw], "cpu")
    expected = TF.pil_to_tensor(decode_image(path))
    assert image.shape == expected.shape
    assert torch.equal(image, expected)


def test_read_plain_jpeg_leaves_everything_else_to_pillow(tmp_path: Path) -> None:
    gray = tmp_path / "gray.jpg"
    Image.new("L", (20, 10), 90).save(gray)
    assert read_plain_jpeg(gray) is not None
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(cmyk)
    png = _solid(tmp_path / "a.png", (1, 2, 3))
    truncated = tmp_path / "truncated.jpg"
    _noise(64, 64).save(tmp_path / "whole.jpg", quality=90)
    truncated.write_bytes((tmp_path / "whole.jpg").read_bytes()[:-300])
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    for path in (cmyk, png, truncated, text, tmp_path / "missing.jpg"):
        assert read_plain_jpeg(path) is None, path


def test_decode_jpegs_isolates_a_file_the_decoder_rejects(tmp_path: Path) -> None:
    good = read_plain_jpeg(_solid(tmp_path / "good.jpg", (200, 30, 30), quality=95))
    assert good is not None
    corrupt = good._replace(data=torch.cat([good.data[:40], torch.zeros(200, dtype=torch.uint8), good.data[-2:]]))
    decoded = decode_jpegs([good, corrupt, good], "cpu")
    assert decoded[1] is None
    assert decoded[0] is not None and torch.equal(decoded[0], decoded[2])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_batch_loader_device_decode_matches_pillow_path(tmp_path: Path, num_workers: int) -> None:
    names, bad = _loader_inputs(tmp_path)
    for i in range(3):  # plain JPEGs (one rotated, one grayscale) among the PNGs and failures
        exif = Image.Exif()
        exif[0x0112] = 6 if i == 1 else 1
        image = _noise(70 + 9 * i, 50, seed=i)
        (image.convert("L") if i == 2 else image).save(tmp_path / f"j{i}.jpg", exif=exif.tobytes(), quality=90)
        names.append(f"j{i}.jpg")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    names.append("cmyk.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "j0.jpg").read_bytes()[:-200])
    names += ["cut.jpg"]
    cfg = PreprocessConfig(input_size=32, resize_size=40)

    def run(**kwargs: object) -> tuple[list[int], torch.Tensor, list[DecodeFailure], ImageBatchLoader]:
        loader = ImageBatchLoader(names, cfg, root=tmp_path, batch_size=5, num_workers=num_workers, **kwargs)
        batches = list(loader)
        return ([i for b in batches for i in b.indices], torch.cat([b.images for b in batches]),
                [f for b in batches for f in b.failures], loader)

    indices, images, failures, pillow = run()
    device_indices, device_images, device_failures, device = run(jpeg_device="cpu")
    assert device_indices == indices
    assert device_failures == failures
    assert [f.index for f in failures] == sorted([*bad, len(names) - 1])
    assert torch.equal(device_images, images)
    assert device.device_decode_seconds > 0 and pillow.device_decode_seconds == 0
    assert pillow.worker_decode_seconds > 0 and pillow.worker_preprocess_seconds > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")
def test_nvjpeg_matches_pillow_on_real_photos(cub100: Path) -> None:
    names = list_images(cub100)[:32]
    cfg = PreprocessConfig()
    (cpu,) = list(ImageBatchLoader(names, cfg, root=cub100, batch_size=32))
    (gpu,) = list(ImageBatchLoader(names, cfg, root=cub100, batch_size=32, jpeg_device="cuda"))
    assert gpu.indices == cpu.indices and gpu.images.is_cuda
    # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a few levels.
    difference = (gpu.images.cpu().int() - cpu.images.int()).abs().float()
    assert difference.mean() < 2.0, difference.mean()


# --------------------------------------------------------------------------- real photos


def test_real_photos(cub100: Path) -> None:
    names = list_images(cub100)[:8]
    assert len(names) == 8
    cfg = PreprocessConfig()
    for name in names:
        out = load_image(cub100 / name, cfg)
        assert out.dtype == torch.uint8 and out.shape == (3, 224, 224)
        assert out.float().std() > 5  # a real photo, not a constant image
    (batch,) = list(ImageBatchLoader(names, cfg, root=cub100, batch_size=8))
    assert batch.indices == list(range(8)) and batch.failures == []
    assert torch.equal(batch.images[0], load_image(cub100 / names[0], cfg))
