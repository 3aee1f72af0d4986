"""The measurements behind the constants of fgh's CPU Hamming search (fgh_deploy/search.py).

Each section prints what one constant or layout choice rests on, on this machine:

- ufunc rates: ``xor`` and ``bitwise_count`` elements per second (why a step is large: the
  Python cost per step is what is left to win, ``_STEP_ELEMENTS``);
- a broadcast ``xor`` of 32 queries over rows of several lengths (``_GROUP_QUERIES``);
- the uint8 ``min`` reduction over blocks of 64 and 1024 rows (``_BLOCK_ROWS``);
- word layouts, numpy passes for 64 queries: 32-bit codes as ``uint32`` vs padded ``uint64``,
  48-bit codes padded to ``uint64`` vs ``uint32`` + ``uint16`` (``_to_columns``);
- a step's buffers freshly allocated vs reused (``_scratch``);
- one query over 1M 128-bit codes, one thread, compiled kernel vs numpy passes (the fused
  kernel; ``fgh bench search --kernel numpy`` measures the same at any size).

Timings are the best of ``--repeats`` runs (the least disturbed on a shared machine).

Usage: python benchmarks/search_kernels.py [--rows 1000000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fgh_deploy.bench import bench_search  # noqa: E402
from fgh_deploy.search import cpu_kernel  # noqa: E402

GROUP = 32  # queries per step, as _GROUP_QUERIES
STEP_ROWS = 16384  # rows per step for a full group (_STEP_ELEMENTS // _GROUP_QUERIES)


def best_seconds(call: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def ufunc_rates(rng: np.random.Generator, repeats: int) -> None:
    rows = GROUP * STEP_ROWS  # one step's distances: the operands stay in cache, as in a scan
    print(f"ufunc rates over {rows:,} elements (G elements/s):")
    for dtype in (np.uint8, np.uint32, np.uint64):
        a = rng.integers(0, np.iinfo(dtype).max, rows, dtype=dtype, endpoint=True)
        b = rng.integers(0, np.iinfo(dtype).max, rows, dtype=dtype, endpoint=True)
        out, count = np.empty_like(a), np.empty(rows, np.uint8)
        xor = best_seconds(lambda: np.bitwise_xor(a, b, out=out), repeats)
        popcount = best_seconds(lambda: np.bitwise_count(a, out=count), repeats)
        print(f"  {np.dtype(dtype).name:>6}: xor {rows / xor / 1e9:5.2f}, bitwise_count {rows / popcount / 1e9:5.2f}")


def broadcast_rows(rng: np.random.Generator, repeats: int) -> None:
    print(f"broadcast xor, {GROUP} queries x rows (G elements/s):")
    queries = rng.integers(0, 2**63, (GROUP, 1), dtype=np.uint64)
    for rows in (256, 1024, 4096, 16384, 65536):
        column = rng.integers(0, 2**63, rows, dtype=np.uint64)
        out = np.empty((GROUP, rows), np.uint64)
        # Many calls per timing so short rows are not lost in the clock's resolution.
        calls = max(1, (1 << 22) // (GROUP * rows))

        def run() -> None:
            for _ in range(calls):
                np.bitwise_xor(column, queries, out=out)

        print(f"  {rows:>6} rows: {calls * GROUP * rows / best_seconds(run, repeats) / 1e9:5.2f}")


def block_minimum(rng: np.random.Generator, repeats: int) -> None:
    print(f"uint8 min reduction over a {GROUP} x {STEP_ROWS} step (G elements/s):")
    dist = rng.integers(0, 65, (GROUP, STEP_ROWS), dtype=np.uint8)
    for block in (64, 256, 1024):
        blocks = dist.reshape(GROUP, -1, block)
        seconds = best_seconds(lambda: np.minimum.reduce(blocks, axis=2), repeats)
        print(f"  blocks of {block:>4} rows: {dist.size / seconds / 1e9:5.2f}")


def layouts(rng: np.random.Generator, rows: int, repeats: int) -> None:
    print(f"word layouts, numpy passes, 64 queries over {rows:,} codes (ms):")
    cases = {
        "32-bit as uint32": [np.uint32],
        "32-bit as uint64 (padded)": [np.uint64],
        "48-bit as uint64 (padded)": [np.uint64],
        "48-bit as uint32 + uint16": [np.uint32, np.uint16],
    }
    for name, dtypes in cases.items():
        columns = [rng.integers(0, np.iinfo(dt).max, rows, dtype=dt, endpoint=True) for dt in dtypes]
        queries = [rng.integers(0, np.iinfo(dt).max, (GROUP, 1), dtype=dt, endpoint=True) for dt in dtypes]
        xors = [np.empty((GROUP, STEP_ROWS), dt) for dt in dtypes]
        dist, count = np.empty((GROUP, STEP_ROWS), np.uint8), np.empty((GROUP, STEP_ROWS), np.uint8)

        def scan() -> None:
            for _ in range(2):  # two groups of 32: 64 queries
                for start in range(0, rows - STEP_ROWS + 1, STEP_ROWS):
                    for i, (col, q, xor) in enumerate(zip(columns, queries, xors)):
                        np.bitwise_xor(col[start : start + STEP_ROWS], q, out=xor)
                        np.bitwise_count(xor, out=dist if i == 0 else count)
                        if i:
                            np.add(dist, count, out=dist)

        print(f"  {name:<27} {best_seconds(scan, repeats) * 1e3:8.1f}")


def fresh_buffers(repeats: int) -> None:
    print("a step's buffers (4 MiB uint64 xor + 0.5 MiB uint8 distances), first touch (ms):")
    size = GROUP * STEP_ROWS
    kept = np.empty(size, np.uint64), np.empty(size, np.uint8)
    held = []  # fresh buffers stay alive, so no allocation gets back pages already touched

    def fresh() -> None:
        held.append((np.empty(size, np.uint64), np.empty(size, np.uint8)))
        held[-1][0].fill(0)
        held[-1][1].fill(0)

    def reused() -> None:
        kept[0].fill(0)
        kept[1].fill(0)

    print(f"  fresh {best_seconds(fresh, repeats) * 1e3:.3f}, reused {best_seconds(reused, repeats) * 1e3:.3f}")


def kernels(rows: int, repeats: int) -> None:
    print(f"one query over {rows:,} 128-bit codes, one thread (M codes/s):")
    for kernel in ("compiled", "numpy"):
        if kernel == "compiled" and cpu_kernel() == "numpy":
            print("  compiled: not built here")
            continue
        report = bench_search(rows, 128, queries=(1,), repeats=repeats, threads=1, kernel=kernel,
                              compare_faiss=False)
        entry = report["results"][0]
        print(f"  {report['ours']['kernel']}: {entry['ours']['codes_per_second'] / 1e6:,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="codes in the layout and kernel runs")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"# numpy {np.__version__}, auto kernel here: {cpu_kernel()}, best of {args.repeats}")
    ufunc_rates(rng, args.repeats)
    broadcast_rows(rng, args.repeats)
    block_minimum(rng, args.repeats)
    layouts(rng, args.rows, args.repeats)
    fresh_buffers(args.repeats)
    kernels(args.rows, args.repeats)


if __name__ == "__main__":
    main()
