"""PyTorch eager vs ONNX Runtime encode throughput on this machine, per model (one run, same batch).

Random weights (throughput does not depend on them), efficientnet_lite0 at 224 px by default.
Usage: python benchmarks/engine_throughput.py [--backbone efficientnet_lite0] [--bits 32] [--batch 16]
       [--iterations 5] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import fgh_deploy as fgh  # noqa: E402
from fgh_deploy.bench import bench_engine  # noqa: E402
from fgh_deploy.engines import load_engine  # noqa: E402
from fgh_deploy.export import export_onnx  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in fgh.list_models():
            torch.manual_seed(0)
            model = fgh.build_model(name, args.bits, backbone=args.backbone)
            ckpt = fgh.save_checkpoint(model, Path(tmp) / f"{name}.pt")
            meta = {"model": model.config.to_dict(), "preprocess": model.preprocess.to_dict(),
                    "fingerprint": fgh.load_checkpoint(ckpt).fingerprint}
            onnx_path = export_onnx(model.eval(), Path(tmp) / f"{name}.onnx", metadata=meta)
            row = {"model": name}
            for kind, path in (("pytorch", ckpt), ("onnxruntime", onnx_path)):
                with load_engine(path) as engine:
                    report = bench_engine(engine, batch_sizes=(args.batch,), warmup=2, iterations=args.iterations)
                row[kind] = report["results"][0]["images_per_second"]
            rows.append(row)
            print(f"{name:8s} {args.backbone} {args.bits} bits, batch {args.batch}: PyTorch eager "
                  f"{row['pytorch']:6.1f} img/s, ONNX Runtime {row['onnxruntime']:6.1f} img/s "
                  f"(×{row['onnxruntime'] / row['pytorch']:.2f})", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
