"""Sharded encoding into one Milvus collection: N ``fgh encode --shard K/N`` processes against one.

    .venv/bin/python benchmarks/milvus_sharded_encode.py ../shared/data/cub100 MODEL.pt --workers 1,2

Starts a Milvus Lite server on a loopback port (a stand-in for a cluster), then for each N runs N
worker processes at once into a fresh collection and reports the wall time, images/s and whether
the collection holds the same rows as the one-worker run.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from fgh_deploy.index_uri import parse_index_name
from fgh_deploy.milvus_index import MilvusIndex


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("--workers", default="1,2", help="Worker process counts, comma-separated.")
    parser.add_argument("--decoders", type=int, default=0, help="--workers (decoding processes) of each worker.")
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from milvus_lite.server import Server
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="fgh-shards-") as tmp:
        server = Server(str(Path(tmp) / "server.db"), f"127.0.0.1:{port}")
        server.init()
        server.start()
        time.sleep(3)
        reference = None
        try:
            for n in map(int, args.workers.split(",")):
                name = f"milvus://127.0.0.1:{port}/workers{n}"
                command = [sys.executable, "-m", "fgh_deploy.cli", "encode", str(args.folder), "-m", str(args.model),
                           "--out", name, "--workers", str(args.decoders), "--device", "cpu", "--json"]
                start = time.perf_counter()
                procs = [subprocess.Popen(command + (["--shard", f"{k}/{n}"] if n > 1 else []),
                                          stdout=subprocess.PIPE, text=True) for k in range(1, n + 1)]
                outputs = [json.loads(p.communicate()[0]) for p in procs]
                seconds = time.perf_counter() - start
                with MilvusIndex.open(parse_index_name(name)) as index:
                    rows = index.all_rows()
                same = None if reference is None else (
                    rows[1] == reference[1] and bool(np.array_equal(rows[0], reference[0])))
                reference = reference or rows
                encoded = sum(o["encoded"] for o in outputs)
                print(json.dumps({"workers": n, "encoded": encoded, "per_worker": [o["encoded"] for o in outputs],
                                  "seconds": round(seconds, 1), "images_per_second": round(encoded / seconds, 1),
                                  "same_rows_as_first": same}), flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
