"""fgh encode / fgh query end to end: bad files, kill -9 and resume, folder changes, mismatches, JSON."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fgh_deploy as fgh
from fgh_deploy.encode import SKIPPED_LOG, encode_folder
from fgh_deploy.engines import load_engine
from fgh_deploy.images import LINK_NOT_FOLLOWED
from fgh_deploy.index import CodeIndex
from fgh_deploy.query import search_codes, search_images
from fgh_deploy.search import knn_hamming

ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(path: Path, seed: int = 0, bits: int = 24) -> Path:
    torch.manual_seed(seed)
    return fgh.save_checkpoint(fgh.build_model("adsh", bits, backbone="resnet18", input_size=64), path)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "adsh24.pt")


@pytest.fixture
def folder(tmp_path: Path, cub100: Path) -> Path:
    """24 real bird photos in 3 species folders, plus the usual garbage."""
    root = tmp_path / "images"
    for species in sorted(p for p in cub100.iterdir() if p.is_dir())[:3]:
        (root / species.name).mkdir(parents=True)
        for src in sorted(species.glob("*.jpg"))[:8]:
            shutil.copy(src, root / species.name / src.name)
    (root / "bad").mkdir()
    (root / "bad" / "empty.jpg").write_bytes(b"")
    (root / "bad" / "text.jpg").write_text("not an image")
    good = next((root).glob("*/*.jpg")).read_bytes()
    (root / "bad" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "bad" / "broken_link.jpg").symlink_to(root / "missing.jpg")
    (root / "bad" / "loop").symlink_to(root / "bad")
    (root / ".hidden.jpg").write_bytes(good)
    (root / "notes.txt").write_text("ignored")
    return root


def _encode(folder: Path, model: Path, out: Path, device: str = "auto", **kwargs):
    with load_engine(model, device=device) as engine:
        return encode_folder(folder, engine, out, progress=False, workers=kwargs.pop("workers", 0), **kwargs)


def test_encode_skips_bad_files_and_lists_them(folder: Path, model_path: Path, tmp_path: Path) -> None:
    summary = _encode(folder, model_path, tmp_path / "idx", batch_size=5)
    assert summary.images == 28 and summary.encoded == 24
    skipped = {s["path"]: s["reason"] for s in summary.skipped}
    assert set(skipped) == {"bad/empty.jpg", "bad/text.jpg", "bad/truncated.jpg", "bad/broken_link.jpg", "bad/loop"}
    assert "empty file" in skipped["bad/empty.jpg"] and "broken symlink" in skipped["bad/broken_link.jpg"]
    assert skipped["bad/loop"] == LINK_NOT_FOLLOWED  # listed, not walked
    log_lines = (tmp_path / "idx" / SKIPPED_LOG).read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in log_lines) == sorted(skipped)
    with CodeIndex.open(tmp_path / "idx") as index:
        assert len(index) == 24 and index.bits == 24 and index.code_size == 3
        assert index.all_paths() == sorted(index.all_paths())
        assert all(not p.startswith(("bad/", ".")) for p in index.all_paths())
        assert index.engine["kind"] == "pytorch"
    assert summary.index_bytes > 24 * 3


def test_index_codes_equal_the_engine_codes(folder: Path, model_path: Path, tmp_path: Path) -> None:
    # On the CPU: the FP32 model on Pillow-decoded images is the reference, bit for bit (on CUDA,
    # autocast and nvJPEG flip a few bits; test_gpu_decode_codes_agree_with_pillow_decode covers that).
    _encode(folder, model_path, tmp_path / "idx", device="cpu", workers=2, batch_size=7)
    model = fgh.load_model(model_path)
    with CodeIndex.open(tmp_path / "idx") as index:
        from fgh_deploy.bits import pack_codes
        from fgh_deploy.images import load_image

        batch = torch.stack([load_image(folder / p, model.preprocess) for p in index.all_paths()])
        with torch.no_grad():
            expected = pack_codes(model(batch).numpy())
        assert np.array_equal(np.asarray(index.codes), expected)


def test_short_batches_are_padded_for_gpu_engines(folder: Path, model_path: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import fgh_deploy.encode as encode_module

    reference = _encode(folder, model_path, tmp_path / "ref", device="cpu", batch_size=5)
    shapes = []
    with load_engine(model_path, device="cpu") as engine:
        encode = engine.encode
        monkeypatch.setattr(engine, "encode", lambda images: shapes.append(tuple(images.shape)) or encode(images))
        # Treated as a GPU engine (the padding rule), run on the CPU.
        monkeypatch.setattr(encode_module, "engine_cuda_device", lambda e: torch.device("cuda"))
        padded = encode_folder(folder, engine, tmp_path / "padded", batch_size=5, workers=0, progress=False,
                               gpu_decode=False)
    assert padded.encoded == reference.encoded == 24
    # Batches that lost unreadable files and the short last one are all padded to 5 images.
    assert shapes and {s[0] for s in shapes} == {5}
    with CodeIndex.open(tmp_path / "ref") as a, CodeIndex.open(tmp_path / "padded") as b:
        assert a.all_paths() == b.all_paths()
        np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))


def test_rerun_encodes_only_new_images_and_drops_deleted_ones(folder: Path, model_path: Path, tmp_path: Path) -> None:
    _encode(folder, model_path, tmp_path / "idx")
    again = _encode(folder, model_path, tmp_path / "idx")
    assert (again.encoded, again.reused, again.removed) == (0, 24, 0)
    photos = sorted(p for p in folder.glob("*/*.jpg") if p.parent.name != "bad")
    victim = photos[0]
    new = folder / victim.parent.name / "new.jpg"
    shutil.copy(photos[-1], new)
    victim.unlink()
    changed = _encode(folder, model_path, tmp_path / "idx")
    assert (changed.encoded, changed.removed) == (1, 1)
    with CodeIndex.open(tmp_path / "idx") as index:
        paths = index.all_paths()
    assert len(paths) == 24 and str(victim.relative_to(folder)) not in paths and paths[-1].endswith("new.jpg")


def test_another_model_or_folder_is_refused(folder: Path, model_path: Path, tmp_path: Path) -> None:
    _encode(folder, model_path, tmp_path / "idx")
    other = _checkpoint(tmp_path / "other.pt", seed=1)
    with pytest.raises(fgh.FghError, match="idx.*--rebuild"):
        _encode(folder, other, tmp_path / "idx")
    longer = _checkpoint(tmp_path / "longer.pt", bits=32)
    with pytest.raises(fgh.FghError, match="24 bits"):
        _encode(folder, longer, tmp_path / "idx")
    with CodeIndex.open(tmp_path / "idx") as index, load_engine(other) as engine:
        with pytest.raises(fgh.FghError):
            search_images(index, engine, [next(folder.glob("*/0*.jpg"))])
    rebuilt = _encode(folder, other, tmp_path / "idx", rebuild=True)
    assert rebuilt.encoded == 24


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fgh_deploy.cli", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _encode_process(folder: Path, model: Path, out: Path) -> subprocess.Popen:
    # Commit after every batch of 2, so the kill lands between commits of a run still in progress.
    code = ("import sys; from fgh_deploy.engines import load_engine; from fgh_deploy.encode import encode_folder\n"
            "with load_engine(sys.argv[2]) as e:\n"
            "    encode_folder(sys.argv[1], e, sys.argv[3], batch_size=2, workers=0, progress=False, commit_seconds=0)")
    return subprocess.Popen([sys.executable, "-c", code, str(folder), str(model), str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_minus_nine_then_resume_equals_a_clean_index(folder: Path, model_path: Path, tmp_path: Path) -> None:
    args = ["--engine", str(model_path), "--batch-size", "2", "--workers", "0", "--json"]
    clean = _cli("encode", str(folder), "--out", str(tmp_path / "clean"), *args)
    assert clean.wait(timeout=300) == 0, clean.stderr.read()
    victim = _encode_process(folder, model_path, tmp_path / "killed")
    manifest = tmp_path / "killed" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline and victim.poll() is None:
        if manifest.exists() and json.loads(manifest.read_text() or "{}").get("ntotal", 0) > 0:
            break
        time.sleep(0.01)
    assert victim.poll() is None, "encode finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    with CodeIndex.open(tmp_path / "killed") as partial:
        assert 0 < len(partial) < 24
    resumed = _cli("encode", str(folder), "--out", str(tmp_path / "killed"), *args)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    with CodeIndex.open(tmp_path / "clean") as a, CodeIndex.open(tmp_path / "killed") as b:
        assert a.all_paths() == b.all_paths()
        assert np.array_equal(np.asarray(a.codes), np.asarray(b.codes))
        assert np.array_equal(np.asarray(a.stats), np.asarray(b.stats))


def test_query_json_schema_and_order(folder: Path, model_path: Path, tmp_path: Path) -> None:
    _encode(folder, model_path, tmp_path / "idx")
    queries = sorted(p for p in folder.glob("*/*.jpg") if p.parent.name != "bad")[:2]
    proc = _cli("query", *map(str, queries), "--index", str(tmp_path / "idx"), "--top-k", "5", "--json")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    payload = json.loads(out)
    assert payload["schema_version"] == 1 and payload["bits"] == 24 and payload["ntotal"] == 24
    assert payload["tie_rule"] == "distance, then database order"
    assert [q["query"] for q in payload["queries"]] == [str(q) for q in queries]
    for q, path in zip(payload["queries"], queries):
        hits = q["results"]
        assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
        assert set(hits[0]) == {"rank", "distance", "row", "path", "tie_group"}
        # The query image is in the index: it is its own nearest neighbour at distance 0.
        assert hits[0]["distance"] == 0 and hits[0]["path"] == str(path.relative_to(folder))
        assert [(h["distance"], h["row"]) for h in hits] == sorted((h["distance"], h["row"]) for h in hits)


def test_search_by_code_equals_code_to_code_search(folder: Path, model_path: Path, tmp_path: Path) -> None:
    _encode(folder, model_path, tmp_path / "idx")
    with CodeIndex.open(tmp_path / "idx") as index:
        codes = np.asarray(index.codes)
        hits = search_codes(index, codes[:3], top_k=6)
        distances, rows = knn_hamming(codes[:3], codes, 6)
        assert [[h.row for h in q] for q in hits] == rows.tolist()
        within = search_codes(index, codes[:3], top_k=100, radius=3)
        for q, h in enumerate(within):
            assert all(hit.distance <= 3 for hit in h)
            assert len(h) == int((distances[q] <= 3).sum()) or len(h) > 6


def _query_json(folder: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    queries = sorted(p for p in folder.glob("*/*.jpg") if p.parent.name != "bad")[:2]
    return subprocess.run([sys.executable, "-m", "fgh_deploy.cli", "query", *map(str, queries), "--index",
                           str(tmp_path / "idx"), "--top-k", "30", "--radius", "12", "--json", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_query_on_a_cuda_search_device_without_cuda_is_a_clear_error(folder: Path, model_path: Path,
                                                                     tmp_path: Path) -> None:
    _encode(folder, model_path, tmp_path / "idx")
    proc = _query_json(folder, tmp_path, "--search-device", "cuda")
    assert proc.returncode == 3 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == (
        "fgh: error: device 'cuda' requested but CUDA is not available here")
    proc = _query_json(folder, tmp_path, "--search-device", "gpu")
    assert proc.returncode == 1 and "device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'" in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_query_on_the_gpu_equals_query_on_the_cpu(folder: Path, model_path: Path, tmp_path: Path) -> None:
    _encode(folder, model_path, tmp_path / "idx")
    cpu, gpu = (_query_json(folder, tmp_path, "--search-device", d) for d in ("cpu", "cuda"))
    assert cpu.returncode == 0 and gpu.returncode == 0, gpu.stderr
    assert json.loads(cpu.stdout) == json.loads(gpu.stdout)
    with CodeIndex.open(tmp_path / "idx") as index:
        codes = np.asarray(index.codes)
        assert index.searcher("cuda") is index.searcher("cuda") is not index.searcher("cpu")
        for a, b in zip(index.search(codes, 7), index.search(codes, 7, device="cuda")):
            np.testing.assert_array_equal(a, b)


def test_query_errors_are_one_line(folder: Path, model_path: Path, tmp_path: Path) -> None:
    _encode(folder, model_path, tmp_path / "idx")
    proc = _cli("query", str(folder / "bad" / "text.jpg"), "--index", str(tmp_path / "idx"))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1].startswith("fgh: error:") and "text.jpg: not an image" in err
    proc = _cli("query", str(folder / "bad" / "text.jpg"), "--index", str(tmp_path / "nope"))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "nope" in err


def test_gpu_decode_needs_an_engine_on_cuda(folder: Path, model_path: Path, tmp_path: Path) -> None:
    with load_engine(model_path, device="cpu") as engine:
        with pytest.raises(fgh.FghError, match=r"adsh24\.pt: GPU decoding needs an engine on a CUDA device"):
            encode_folder(folder, engine, tmp_path / "idx", progress=False, workers=0, gpu_decode=True)
    assert not (tmp_path / "idx").exists()
    summary = _encode(folder, model_path, tmp_path / "idx", gpu_decode=False)
    assert summary.encoded == 24 and summary.timings["gpu_decode"] == 0
    assert summary.image_seconds["decode"] > 0 and summary.image_seconds["preprocess"] > 0


def test_gpu_decode_default_depends_on_the_decoding_workers(model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fgh_deploy.encode as encode_module

    cuda = torch.device("cuda", 0)
    with load_engine(model_path, device="cpu") as engine:
        assert encode_module._decode_device(engine, None, 0) is None  # a CPU engine never decodes on a GPU
        monkeypatch.setattr(encode_module, "engine_cuda_device", lambda e: cuda)  # the rule for a CUDA engine
        below = encode_module.GPU_DECODE_BELOW_WORKERS
        assert encode_module._decode_device(engine, None, below - 1) == cuda
        assert encode_module._decode_device(engine, None, below) is None
        assert encode_module._decode_device(engine, True, 8) == cuda
        assert encode_module._decode_device(engine, False, 0) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")
def test_gpu_decode_codes_agree_with_pillow_decode(folder: Path, model_path: Path, tmp_path: Path) -> None:
    with load_engine(model_path, device="cuda") as engine:
        gpu = encode_folder(folder, engine, tmp_path / "gpu", progress=False, workers=2)
        cpu = encode_folder(folder, engine, tmp_path / "cpu", progress=False, workers=2, gpu_decode=False)
    assert gpu.timings["gpu_decode"] > 0 and cpu.timings["gpu_decode"] == 0
    assert [s["path"] for s in gpu.skipped] == [s["path"] for s in cpu.skipped]
    with CodeIndex.open(tmp_path / "gpu") as a, CodeIndex.open(tmp_path / "cpu") as b:
        assert a.all_paths() == b.all_paths()
        bits_a = np.unpackbits(np.asarray(a.codes), axis=1)
        bits_b = np.unpackbits(np.asarray(b.codes), axis=1)
        assert (bits_a == bits_b).mean() > 0.97
