#!/usr/bin/env bash
# The real-data result of the training issue: each model at 32 bits on ../shared/data/cub100 with the
# offline-pretrained efficientnet_lite0 and the `fast` preset (≤ 20 min of training per model on a
# 2-core CPU), then `fgh eval --baselines` (both protocols, and LSH/ITQ/float cosine on the same
# pretrained features). benchmarks/cub100_table.py prints the README table from OUT_DIR.
# Usage: benchmarks/train_cub100.sh [OUT_DIR] [MODEL ...]
set -euo pipefail
out=${1:-runs/cub100}
shift || true
models=${*:-adsh a2net semicon agmh}
mkdir -p "$out"
data=$(cd "$(dirname "$0")/../.." && pwd)/shared/data/cub100
for model in $models; do
  /usr/bin/time -f "%e" -o "$out/$model.wall" \
    fgh train --data "$data" --model "$model" --bits 32 --backbone efficientnet_lite0 --preset fast \
      --workers 1 --seed 0 --out "$out/$model"
  fgh eval "$out/$model/best.pt" --workers 1 --baselines --json > "$out/$model/eval.json"
done
