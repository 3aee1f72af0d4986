"""Exact Hamming k-NN: fgh's CPU searcher against FAISS ``IndexBinaryFlat`` (faiss-cpu).

Prints one table row per (codes, bits, threads, query batch): codes compared per second for
each library, the speed-up, and whether FAISS returned the same distances / neighbours and
ours matched an independent brute force. Both libraries run in this process on the same
random codes; "1" threads pins both to one thread, "default" leaves each at its default.

Usage: python benchmarks/search_vs_faiss.py [--sizes 1000000,10000000] [--bits 32,48,64,128]
       [--threads 1,default] [--repeats 3] [--kernel auto|compiled|numpy] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fgh_deploy.bench import bench_search  # noqa: E402
from fgh_deploy.search import cpu_kernel  # noqa: E402

log = logging.getLogger("search_vs_faiss")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,10000000", help="database sizes, comma-separated")
    parser.add_argument("--bits", default="32,48,64,128", help="code lengths, comma-separated")
    parser.add_argument("--threads", default="1,default", help="thread settings: numbers or 'default'")
    parser.add_argument("--queries", default="1,64", help="query batch sizes")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernel", default="auto", help="our CPU kernel: auto, compiled or numpy")
    parser.add_argument("--json", type=Path, help="also write every report to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    sizes = [int(s) for s in args.sizes.split(",")]
    bits_list = [int(b) for b in args.bits.split(",")]
    thread_settings = [None if t == "default" else int(t) for t in args.threads.split(",")]
    batches = tuple(int(q) for q in args.queries.split(","))
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"# CPUs: {os.cpu_count()}, load average at start: {load}, k={args.k}, median of {args.repeats}, "
          f"kernel {args.kernel} (auto here: {cpu_kernel()})")
    # Medians as the report asks; best-of-runs too, since on a shared machine the fastest run
    # is the one least disturbed by other processes, for both libraries alike.
    header = (f"{'codes':>10} {'bits':>4} {'threads':>7} {'nq':>3} {'ours Mc/s':>10} {'FAISS Mc/s':>10} "
              f"{'speedup':>7} {'best ours':>9} {'best FAISS':>10} {'speedup':>7} {'ours ms/q':>9} "
              f"{'same D':>6} {'same I':>6} {'exact':>5}")
    print(header)
    print("-" * len(header))
    reports = []
    for n in sizes:
        for bits in bits_list:
            for threads in thread_settings:
                report = bench_search(n, bits, queries=batches, k=args.k, repeats=args.repeats, threads=threads,
                                      kernel=args.kernel)
                reports.append(report)
                label = f"{report['ours']['threads']}/{report['faiss'].get('threads', '-')}"
                for entry in report["results"]:
                    print(_row(n, bits, label, entry), flush=True)
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1))
    print(f"# load average at end: {os.getloadavg() if hasattr(os, 'getloadavg') else None}")


def _row(n: int, bits: int, threads: str, entry: dict) -> str:
    ours, faiss = entry["ours"], entry["faiss"]
    nan = float("nan")
    best_ours = n * entry["queries"] / min(ours["runs"]) / 1e6
    best_faiss = n * entry["queries"] / min(faiss["runs"]) / 1e6 if faiss else nan

    def flag(value: bool | None) -> str:
        return "-" if value is None else "yes" if value else "NO"

    return (f"{n:>10} {bits:>4} {threads:>7} {entry['queries']:>3} {ours['codes_per_second'] / 1e6:>10.0f} "
            f"{faiss['codes_per_second'] / 1e6 if faiss else nan:>10.0f} "
            f"{entry['speedup_vs_faiss'] or nan:>7.2f} {best_ours:>9.0f} {best_faiss:>10.0f} "
            f"{best_ours / best_faiss:>7.2f} {ours['seconds_per_query'] * 1e3:>9.3f} "
            f"{flag(entry['same_distances']):>6} {flag(entry['same_neighbours']):>6} "
            f"{flag(entry['matches_reference']):>5}")


if __name__ == "__main__":
    main()
