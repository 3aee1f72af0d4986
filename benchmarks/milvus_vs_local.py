"""Milvus Lite vs fgh's local index vs FAISS on the same random codes: insert rate, query latency, same results.

    .venv/bin/python benchmarks/milvus_vs_local.py --n 1000000 --bits 48,128

Milvus Lite is the embedded single-file Milvus, here as a test stand-in for a cluster, not a speed
claim. Each backend gets the same codes and paths; results are compared as (distance, path) lists.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from fgh_deploy.index import CodeIndex
from fgh_deploy.index_uri import parse_index_name
from fgh_deploy.milvus_index import MilvusIndex


def _timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run(n: int, bits: int, k: int, repeats: int, folder: Path) -> dict:
    rng = np.random.default_rng(bits)
    code_size = -(-bits // 8)
    codes = rng.integers(0, 256, (n, code_size), dtype=np.uint8)
    if bits % 8:
        codes[:, -1] &= (1 << (bits % 8)) - 1
    paths = [f"img/{i:09d}.jpg" for i in range(n)]  # path order = insertion order, so all tie rules agree
    stats = np.zeros((n, 2), np.int64)
    queries = codes[rng.choice(n, 64, replace=False)]
    meta = dict(bits=bits, fingerprint="0" * 64, model={}, preprocess={}, engine={}, root="/")
    report: dict = {"n": n, "bits": bits, "k": k}

    start = time.perf_counter()
    with CodeIndex.create(folder / f"local{bits}", **meta) as local:
        for i in range(0, n, 100_000):
            local.append(codes[i:i + 100_000], paths[i:i + 100_000], stats[i:i + 100_000])
    report["local_append_per_s"] = n / (time.perf_counter() - start)
    local = CodeIndex.open(folder / f"local{bits}", verify=False)
    local.search(queries[:1], k)  # builds the searcher
    report["local_ms_1"] = 1e3 * _timed(lambda: local.search(queries[:1], k), repeats)
    report["local_ms_64"] = 1e3 * _timed(lambda: local.search(queries, k), repeats)

    # FAISS before Milvus: Milvus Lite's server keeps using the CPU after the inserts.
    try:
        import faiss
    except ImportError:
        report["faiss"] = "not installed (pip install 'fgh[bench]')"
    else:
        flat = faiss.IndexBinaryFlat(8 * code_size)
        start = time.perf_counter()
        flat.add(codes)
        report["faiss_add_per_s"] = n / (time.perf_counter() - start)
        report["faiss_ms_1"] = 1e3 * _timed(lambda: flat.search(queries[:1], k), repeats)
        report["faiss_ms_64"] = 1e3 * _timed(lambda: flat.search(queries, k), repeats)
        d_faiss, _ = flat.search(queries, k)
        report["faiss_same_distances"] = bool(np.array_equal(d_faiss, local.search(queries, k)[0]))
    milvus = MilvusIndex.open_or_create(parse_index_name(f"{folder / 'lite.db'}#codes{bits}"), **meta)
    start = time.perf_counter()  # Milvus Lite's start-up (about 5 s) not counted
    for i in range(0, n, 20_000):
        milvus.append(codes[i:i + 20_000], paths[i:i + 20_000], stats[i:i + 20_000])
    report["milvus_insert_per_s"] = n / (time.perf_counter() - start)
    milvus.search(queries[:1], k)
    report["milvus_ms_1"] = 1e3 * _timed(lambda: milvus.search(queries[:1], k), repeats)
    report["milvus_ms_64"] = 1e3 * _timed(lambda: milvus.search(queries, k), repeats)

    d_local, i_local = local.search(queries, k)
    d_milvus, i_milvus = milvus.search(queries, k)
    report["same_results"] = bool(np.array_equal(d_local, d_milvus)) and all(
        local.paths(a) == milvus.paths(b) for a, b in zip(i_local, i_milvus))

    milvus.close()
    local.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--bits", default="48,128")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fgh-milvus-bench-") as tmp:
        for bits in map(int, args.bits.split(",")):
            print(json.dumps(run(args.n, bits, args.top_k, args.repeats, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
