#!/usr/bin/env bash
# The CUDA checks, for a machine with an NVIDIA GPU and fgh installed (TensorRT optional):
#   benchmarks/gpu_checks.sh STAGE DATA OUT
# STAGE: tests   the whole suite (CUDA tests included; xdist when installed)
#        search  GPU vs CPU Hamming search, 1M and 10M codes at 32/48/64/128 bits
#        train   ADSH-32 `--preset fast` on DATA (AMP, pinned memory), then fgh eval
#        encode  fgh bench engine / fgh bench encode (nvJPEG vs Pillow decode) with that checkpoint
#        trt     issue 16 in under ten minutes: the CUDA tests, fgh doctor, tests/test_tensorrt.py with
#                TensorRT's log, benchmarks/trt_checks.py (DATA unused: pass -)
# DATA is an image folder with splits.tsv (e.g. ../shared/data/cub100); results land in OUT.
set -euo pipefail
stage=$1 data=$2 out=$3
mkdir -p "$out"

# ---- trt stage helpers
TRT_STAGE_SECONDS=570  # the lent machine's ten minutes, less a margin for the start and the copy back
# Tests whose names say they need (or behave differently with) CUDA, a GPU provider or TensorRT;
# tests/test_tensorrt.py runs on its own below, with TensorRT's log.
CUDA_TESTS="cuda or gpu or nvjpeg or tensorrt or trt or onnx_providers"
TRT_LOGGER=fgh_deploy.engines.trt_format  # fgh's TensorRT logger: INFO as DEBUG, WARNING as WARNING
failed_steps=()

run_step() {  # NAME SECONDS COMMAND...: output to $out/NAME.log and, through $show (default cat), stdout
  local name=$1 limit=$2 rc=0
  shift 2
  echo "== $name (at most ${limit}s): $*"
  # A limit per step, so one hang cannot eat the others' time.
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log" | ${show:-cat} || rc=$?
  case $rc in
    0) echo "== $name: ok" ;;
    124|137) echo "== $name: TIMED OUT after ${limit}s"; failed_steps+=("$name (timed out)") ;;
    *) echo "== $name: FAILED (exit $rc)"; failed_steps+=("$name (exit $rc)") ;;
  esac
}

trt_log_view() {  # stdin: a pytest log at DEBUG; stdout: all of it but other loggers' DEBUG lines
  awk -v keep="^DEBUG $TRT_LOGGER" '!/^DEBUG / || $0 ~ keep'
}

trt_log_summary() {  # LOG: count TensorRT's warnings, errors and INFO lines; the distinct warnings, most frequent first
  local log=$1 warnings errors infos
  warnings=$(grep -c "^WARNING $TRT_LOGGER: TensorRT: " "$log" || true)
  errors=$(grep -c "^DEBUG $TRT_LOGGER: TensorRT error: " "$log" || true)
  infos=$(grep -c "^DEBUG $TRT_LOGGER: TensorRT: " "$log" || true)
  echo "TensorRT log summary: $warnings warnings, $errors errors, $infos INFO lines (full log: $log)"
  grep "^WARNING $TRT_LOGGER: TensorRT: " "$log" | sed "s/^WARNING $TRT_LOGGER: TensorRT: //" \
    | sort | uniq -c | sort -rn | head -n 20 || true
}

trt_stage() {
  local stage_end=$((SECONDS + TRT_STAGE_SECONDS)) reason workers
  workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || true)
  run_step cuda_tests 130 python3 -m pytest -q $workers -p no:cacheprovider tests \
    --ignore=tests/test_tensorrt.py -k "$CUDA_TESTS"
  run_step doctor 30 fgh doctor
  if reason=$(python3 -c "import tensorrt" 2>&1 | tail -n 1); then
    show=trt_log_view run_step tensorrt_tests 140 python3 -m pytest -q -s -p no:cacheprovider \
      tests/test_tensorrt.py -o log_cli=true --log-cli-level=DEBUG \
      --log-cli-format="%(levelname)s %(name)s: %(message)s"
    trt_log_summary "$out/tensorrt_tests.log"
  else
    echo "SKIP tensorrt_tests: TensorRT is not importable ($reason)"
  fi
  # The checks get the rest of the stage's time (each has its own limit inside as well).
  local budget=$((stage_end - SECONDS - 15))
  budget=$((budget > 20 ? budget : 20))  # too little to start a check: trt_checks.py then lists them as SKIP
  run_step trt_checks $((budget + 10)) python3 benchmarks/trt_checks.py --budget "$budget"
  if ((${#failed_steps[@]})); then
    local IFS=,
    echo "SUMMARY trt stage: failed: ${failed_steps[*]}"
    return 1
  fi
  echo "SUMMARY trt stage: every step passed (SKIPs are listed above)"
}

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
  trt)
    trt_stage 2>&1 | tee "$out/trt.log"
    ;;
  *)
    echo "unknown stage $stage (tests, search, train, encode, trt)" >&2
    exit 2
    ;;
esac
