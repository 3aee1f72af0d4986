#!/usr/bin/env bash
# The real-data result of the training issue: each model at 32 bits on ../shared/data/cub100 with the
# offline-pretrained efficientnet_lite0, the `fast` preset (≤ 20 min per model on a 2-core CPU),
# then `fgh eval` (both protocols). Usage: benchmarks/train_cub100.sh [OUT_DIR] [MODEL ...]
set -euo pipefail
out=${1:-runs/cub100}
shift || true
models=${*:-adsh a2net semicon agmh}
data=$(cd "$(dirname "$0")/../.." && pwd)/shared/data/cub100
for model in $models; do
  /usr/bin/time -f "$model: train wall %e s" \
    fgh train --data "$data" --model "$model" --bits 32 --backbone efficientnet_lite0 --preset fast \
      --workers 1 --seed 0 --out "$out/$model"
  fgh eval "$out/$model/best.pt" --workers 1 | tee "$out/$model/eval.txt"
done
