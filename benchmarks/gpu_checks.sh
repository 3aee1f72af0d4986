#!/usr/bin/env bash
# The CUDA checks, for a machine with an NVIDIA GPU and fgh installed (TensorRT optional):
#   benchmarks/gpu_checks.sh STAGE DATA OUT
# STAGE: tests   the whole suite (CUDA tests included; xdist when installed)
#        search  GPU vs CPU Hamming search, 1M and 10M codes at 32/48/64/128 bits
#        train   ADSH-32 `--preset fast` on DATA (AMP, pinned memory), then fgh eval
#        encode  fgh bench engine / fgh bench encode (nvJPEG vs Pillow decode) with that checkpoint
# DATA is an image folder with splits.tsv (e.g. ../shared/data/cub100); results land in OUT.
set -euo pipefail
stage=$1 data=$2 out=$3
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
  | tee -a "$out/gpu.txt"
case $stage in
  tests)
    workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || true)
    pytest -q $workers -p no:cacheprovider 2>&1 | tee "$out/pytest.log"
    ;;
  search)
    for n in 1000000 10000000; do
      fgh bench search --n $n --bits 32,48,64,128 --queries 1,64 --repeats 5 --search-device cuda \
        --json > "$out/search_cuda_$n.json"
      fgh bench search --n $n --bits 48,128 --queries 1,64 --repeats 3 --json > "$out/search_cpu_$n.json"
    done
    ;;
  train)
    /usr/bin/time -f "train wall %e s" fgh train --data "$data" --model adsh --bits 32 \
      --backbone efficientnet_lite0 --preset fast --seed 0 --out "$out/adsh" 2>&1 | tail -n 25
    fgh eval "$out/adsh/best.pt" | tee "$out/eval.txt"
    ;;
  encode)
    ckpt=$out/adsh/best.pt
    fgh bench engine "$ckpt" --device cuda --batch 1,8,32,64,128 --iterations 50 --json > "$out/engine_cuda.json"
    for decode in gpu cpu; do
      fgh bench encode "$data" --engine "$ckpt" --device cuda --$decode-decode --json > "$out/encode_$decode.json"
    done
    fgh export "$ckpt" --fp16 --calib "$data" --out-dir "$out/export" 2>&1 | tail -n 20
    fgh bench encode "$data" --engine "$out/export/best.onnx" --json > "$out/encode_onnx_cpu.json"
    ;;
  *)
    echo "unknown stage $stage (tests, search, train, encode)" >&2
    exit 2
    ;;
esac
