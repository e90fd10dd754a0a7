#!/usr/bin/env bash
# The GPU check: one command on a machine with one NVIDIA GPU, about 6 to 8 minutes once installed.
#
#   bash benchmarks/gpu_check.sh              # on the GPU: benchmarks/results/gpu_check.json and a table
#   bash benchmarks/gpu_check.sh --dry-run    # the same scripts at tiny sizes on the CPU: gpu_check_dry_run.json
#
# It installs umo (scripts/setup.sh: the lock, torch 2.13.0 included; on a Linux x86-64 GPU host PyPI's torch is
# the CUDA build) and onnxruntime-gpu beside it (in .gpu-check/ort, for the CUDA execution provider only), then:
#   1. a ReReFL step at FLUX.2 [klein] 4B shapes (benchmarks/train_step.py --size klein-4b): seconds per step,
#      peak memory, MFU, the time per phase (sampling, gradient step, decode, detection, embedding, backward) and
#      the reference KV cache's speed-up at real sizes (goal >= 1.3x);
#   2. the batched reward on the GPU against its floor and against a per-image loop in the public code's style
#      (benchmarks/reward.py; goal >= 5x the loop);
#   3. face detection on onnxruntime's CUDA execution provider against its CPU provider
#      (benchmarks/detect_providers.py);
#   4. 2-process DDP on the one GPU through `accelerate launch`, a smoke test of the launch path
#      (benchmarks/ddp_smoke.py);
# and writes one JSON and one table (benchmarks/gpu_check_report.py). Each part has its own time limit; a part
# that fails or runs out of time is reported as such and the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
if [ "$DRY" = 0 ] && ! nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi failed); run with --dry-run to check the scripts on the CPU" >&2
  exit 2
fi
[ -n "${UMO_SKIP_SETUP:-}" ] || bash scripts/setup.sh || exit 1
PY=$PWD/.venv/bin/python
NAME=gpu_check; [ "$DRY" = 1 ] && NAME=gpu_check_dry_run
PARTS=${UMO_GPU_CHECK_OUT:-$PWD/.gpu-check/$NAME}
rm -rf "$PARTS"; mkdir -p "$PARTS"
start=$(date +%s)
export PYTHONUNBUFFERED=1
PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")

part() {  # part NAME SECONDS COMMAND...: run one part with a limit; its log and exit status under $PARTS
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@" > "$PARTS/$name.log" 2>&1
  local rc=$?
  echo "{\"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" > "$PARTS/$name.status.json"
  tail -n 25 "$PARTS/$name.log"
  if [ $rc = 124 ]; then echo "== $name: stopped, past its ${limit} s"; elif [ $rc != 0 ]; then
    echo "== $name: exit $rc (log: $PARTS/$name.log)"; fi
}

# the tests' small toy world, from its kept models (seconds): the reward's embedder and the detector below
part world 300 "$PY" tests/toyworlds.py "$PWD/.cache"

ORT=()
if [ "$DRY" = 0 ]; then
  ver=$("$PY" -c "import onnxruntime; print(onnxruntime.__version__)")
  part ort_gpu 300 "$PY" -m pip install --quiet --target .gpu-check/ort "onnxruntime-gpu[cuda,cudnn]==$ver"
  ORT=(env "PYTHONPATH=$PWD/.gpu-check/ort")
fi

if [ "$DRY" = 1 ]; then
  part train_step 600 "$PY" benchmarks/train_step.py --size tiny --steps 2 --warmup 1 \
    --toy-world .cache/toy-world-small --out "$PARTS/train_step.json"
  part reward 300 "$PY" benchmarks/reward.py --device cpu --batch 2 --size 128 --face-size 40 --arch r18 \
    --repeats 2 --out "$PARTS/reward.json"
  part detect 300 "$PY" benchmarks/detect_providers.py --batch 2 --size 320 --repeats 3 --out "$PARTS/detect.json"
  part ddp 600 .venv/bin/accelerate launch --config_file infra/accelerate/cpu.yaml --multi_gpu --num_processes 2 \
    --main_process_port "$PORT" benchmarks/ddp_smoke.py "$PARTS/ddp"
else
  part train_step 300 "$PY" benchmarks/train_step.py --size klein-4b --steps 5 --warmup 2 --kv-side 512 \
    --toy-world .cache/toy-world-small --out "$PARTS/train_step.json"
  part reward 120 "$PY" benchmarks/reward.py --device cuda --out "$PARTS/reward.json"
  part detect 120 "${ORT[@]}" "$PY" benchmarks/detect_providers.py --out "$PARTS/detect.json"
  part ddp 180 .venv/bin/accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
    --main_process_port "$PORT" benchmarks/ddp_smoke.py "$PARTS/ddp"
fi

"$PY" benchmarks/gpu_check_report.py "$PARTS" --seconds $(( $(date +%s) - start )) \
  --out "benchmarks/results/$NAME.json" $([ "$DRY" = 1 ] && echo --dry-run)
