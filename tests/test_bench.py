"""The benchmark functions in smoke mode: structure and exactness flags only, never timings."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fgh_deploy as fgh
from fgh_deploy import bench, search
from fgh_deploy.engines import load_engine
from fgh_deploy.errors import FghError


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("bits", [32, 33, 128])
def test_bench_search_smoke(bits: int, device: str) -> None:
    report = bench.bench_search(200_000, bits, queries=(1, 64), k=5, device=device, smoke=True)
    json.dumps(report)
    assert report["benchmark"] == "search" and report["n"] == 10_000 and report["bits"] == bits
    assert report["code_size"] == (bits + 7) // 8
    ours = report["ours"]
    assert ours["index_bytes"] == report["n"] * ours["bytes_per_code"]
    assert ours["device"] == device and ours["threads"] >= 1
    assert bool(ours["layout"]) == (device == "cpu")  # the GPU holds ±1 values, not word columns
    assert ours["kernel"] == ("torch" if device != "cpu" else search.cpu_kernel())
    assert [r["queries"] for r in report["results"]] == [1, 8]
    for entry in report["results"]:
        assert entry["matches_reference"] is True
        assert set(entry["ours"]) == {"seconds_per_call", "seconds_per_query", "codes_per_second", "runs"}
        if _faiss() is None:
            assert entry["faiss"] is None and entry["same_distances"] is None
        else:
            assert entry["same_distances"] is True and entry["same_neighbours"] is True
            assert entry["speedup_vs_faiss"] > 0
    if _faiss() is not None:
        assert report["faiss"]["available"] and report["faiss"]["version"]


def test_bench_search_leaves_faiss_threads_alone() -> None:
    faiss = _faiss()
    if faiss is None:
        pytest.skip("faiss-cpu is not installed")
    before = faiss.omp_get_max_threads()
    report = bench.bench_search(3000, 64, threads=1, smoke=True)
    assert report["faiss"]["threads"] == 1 and report["ours"]["threads"] == 1
    assert faiss.omp_get_max_threads() == before


def test_bench_search_without_faiss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "_import_faiss", lambda: None)
    report = bench.bench_search(3000, 48, smoke=True)
    assert report["faiss"] == {"available": False, "reason": "import faiss failed (pip install faiss-cpu)"}
    assert all(entry["faiss"] is None and entry["matches_reference"] for entry in report["results"])
    assert bench.bench_search(3000, 48, compare_faiss=False, smoke=True)["faiss"]["reason"] == "not asked for"


def test_bench_search_runs_the_kernel_asked_for() -> None:
    report = bench.bench_search(3000, 128, kernel="numpy", compare_faiss=False, smoke=True)
    assert report["ours"]["kernel"] == "numpy" and all(e["matches_reference"] for e in report["results"])
    with pytest.raises(FghError, match="unknown search kernel"):
        bench.bench_search(3000, 128, kernel="fast", smoke=True)


def test_same_neighbours_ignores_only_ties_at_the_kth_distance() -> None:
    d = np.array([[1, 2, 2, 3, 3]])
    ours = np.array([[7, 4, 5, 8, 9]])
    assert bench._same_neighbours(d, ours, d, np.array([[7, 5, 4, 9, 11]]))  # free at distance 3
    assert not bench._same_neighbours(d, ours, d, np.array([[7, 5, 6, 8, 9]]))  # another row at 2
    assert not bench._same_neighbours(d, ours, d + 1, ours)


def test_bench_search_refuses_bad_arguments() -> None:
    with pytest.raises(FghError, match="bits must be at least 1"):
        bench.bench_search(10, 0)
    with pytest.raises(FghError, match="query batch sizes"):
        bench.bench_search(10, 8, queries=(0,))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    torch.manual_seed(0)
    model = fgh.build_model("adsh", 24, backbone="resnet18", input_size=64)
    path = fgh.save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "adsh24.pt")
    with load_engine(path, device="cpu") as opened:
        yield opened


def test_bench_engine_smoke(engine) -> None:
    report = bench.bench_engine(engine, batch_sizes=(1, 8, 32), smoke=True)
    json.dumps(report)
    assert report["benchmark"] == "engine" and report["bits"] == 24 and report["input_size"] == 64
    assert report["engine"]["kind"] == "pytorch"
    assert [r["batch_size"] for r in report["results"]] == [1, 2]
    for entry in report["results"]:
        assert entry["iterations"] == 2
        assert set(entry["latency_ms"]) == {"p50", "p95", "p99", "mean", "min"}
        assert entry["images_per_second"] > 0


def test_bench_encode_smoke(engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "images"
    (folder / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (80, 90, 3), dtype=np.uint8)).save(folder / "a" / f"{i}.jpg")
    (folder / "bad.jpg").write_text("not an image")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    report = bench.bench_encode(folder, engine, batch_size=64, smoke=True)
    json.dumps(report)
    assert report["benchmark"] == "encode" and report["batch_size"] == 4 and report["workers"] == 0
    assert report["images"] == 6 and report["encoded"] == 5 and report["skipped"] == 1
    assert set(report["timings"]) == {"decode_wait", "gpu_decode", "engine", "pack", "write", "other"}
    assert set(report["image_seconds"]) == {"decode", "preprocess"}
    assert set(report["timing_fractions"]) == set(report["timings"])
    assert report["index_bytes"] > 0 and report["bytes_per_image"] == report["index_bytes"] / 5
    assert list(scratch.iterdir()) == []  # the temporary index and links are gone

    assert report["warmup_seconds"] > 0  # one untimed batch first

    limited = bench.bench_encode(folder, engine, limit=2, workers=0, warmup=False)
    assert limited["images"] == 2 and limited["encoded"] == 2 and limited["warmup_seconds"] == 0


def test_bench_encode_refuses_bad_arguments(engine, tmp_path: Path) -> None:
    with pytest.raises(FghError, match="limit must be at least 1"):
        bench.bench_encode(tmp_path, engine, limit=0)
