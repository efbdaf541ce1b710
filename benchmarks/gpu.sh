#!/usr/bin/env bash
# Every GPU figure of the throughput targets in one short run (~10 min on one H100/H200):
#
#   pip install -e . 'jax[cuda12]'   # once, on the GPU machine
#   bash benchmarks/gpu.sh [OUT_DIR]  # default runs/gpu; each step's output in OUT_DIR/<step>.txt
#
# 1. MFU of the ~1.2B Llama-3.2-1B-shaped SFT train step in bfloat16 (target >= 45%), with our
#    attention and with cuDNN flash attention (`model.attention='cudnn'`), and decode tok/s
#    against the HBM roofline (the memory-bandwidth column of `mfu.py`).
# 2. MCTS node expansions per second at B*W*K = 1024*2*4 = 8192 rows per simulation
#    (`search.py` part (b): policy + separate value model, and values read from the decode).
# Each step has its own time limit, so one failing step does not cost the others.
set -u
cd "$(dirname "$0")/.."
out=${1:-runs/gpu}
mkdir -p "$out"
limit=${STEP_TIMEOUT:-240}

step() {
  local name=$1
  shift
  echo "\$ $*" | tee "$out/$name.txt"
  timeout "$limit" "$@" 2>&1 | grep -v 'Warning' | tee -a "$out/$name.txt"
  echo "exit ${PIPESTATUS[0]}" | tee -a "$out/$name.txt"
}

(nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true) 2>&1 | tee "$out/device.txt"
python -c 'import jax; print(jax.__version__, jax.devices())' 2>&1 | tee -a "$out/device.txt"
step mfu_1b python benchmarks/mfu.py --preset=1b --dtype=bfloat16
step mfu_1b_cudnn python benchmarks/mfu.py --preset=1b --dtype=bfloat16 --attention=cudnn --skip-decode
step search_8192 python benchmarks/search.py --part b --b-batch=1024 --repeats=2
