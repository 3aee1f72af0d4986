"""Print the README's cub100 table (and learning curves) from the runs of train_cub100.sh.

Usage: python benchmarks/cub100_table.py [OUT_DIR]   (default runs/cub100)

For each model directory with eval.json (``fgh eval --baselines --json``), metrics.jsonl and
config.json: training wall time, image passes, mAP@all (database order / tie-aware) under both
protocols, and the baselines on the same pretrained features; then the validation mAP at each
evaluation against the image passes trained so far.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/cub100")
    runs = sorted((p.parent for p in out.glob("*/eval.json")), key=lambda p: ["adsh", "a2net", "semicon", "agmh"].index(
        p.name) if p.name in ("adsh", "a2net", "semicon", "agmh") else 99)
    if not runs:
        raise SystemExit(f"{out}: no */eval.json (run benchmarks/train_cub100.sh first)")
    print("| model | train wall | image passes | val mAP (iteration) | asymmetric mAP@all (tie-aware) "
          "| deploy mAP@all (tie-aware) | ITQ | LSH | float cosine | chance |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    curves = {}
    for run in runs:
        report = json.loads((run / "eval.json").read_text())
        config = json.loads((run / "config.json").read_text())
        wall = (out / f"{run.name}.wall").read_text().strip() if (out / f"{run.name}.wall").exists() else "?"
        passes = config["iterations"] * config["epochs"] * config["num_samples"]
        protocols, base = report["protocols"], report.get("baselines", {})

        def cell(metrics: dict) -> str:
            return f"{metrics['map@all/index']:.3f} ({metrics['map@all/expected']:.3f})"

        selection = report["selection"]
        row = [run.name, f"{float(wall):.0f} s" if wall != "?" else wall, f"{passes:,}",
               f"{selection['best_map']:.3f} ({selection['best_iteration'] + 1})",
               cell(protocols["asymmetric"]), cell(protocols["deploy"])]
        row += [f"{base[k]['map@all/expected']:.3f}" if "map@all/expected" in base.get(k, {}) else "-"
                for k in ("itq", "lsh", "cosine")]
        row.append(f"{protocols['deploy']['chance_map@all']:.3f}")
        print("| " + " | ".join(row) + " |")
        per_iteration = config["epochs"] * config["num_samples"]
        curves[run.name] = [(int(r["iteration"] + 1) * per_iteration, r["map"])
                            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "map" in r]
    print("\nvalidation mAP (asymmetric, held-out database images) against image passes:")
    for name, points in curves.items():
        print(f"  {name:10s} " + "  ".join(f"{passes / 1000:g}k {value:.3f}" for passes, value in points))


if __name__ == "__main__":
    main()
