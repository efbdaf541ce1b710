#!/usr/bin/env bash
# Installs the benchmark peers under .peers/ in the repository root (git-ignored):
#   .peers/tunix/     a virtualenv with google-tunix 0.1.7 (it pins its own jax/flax)
#   .peers/trl-site/  trl 1.16.0 + accelerate 1.15.0, used next to the project's own
#                     torch/transformers/datasets (put on PYTHONPATH by the benchmark)
# Usage (from anywhere):  bash benchmarks/setup_peers.sh [tunix] [trl]     (default: both)
# Another location: RLM_PEERS_DIR=/some/dir bash benchmarks/setup_peers.sh (the benchmarks
# read the same variable).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
peers="${RLM_PEERS_DIR:-$repo/.peers}"
python="${PYTHON:-python3}"
which=("$@")
[ ${#which[@]} -eq 0 ] && which=(tunix trl)
mkdir -p "$peers"
for p in "${which[@]}"; do
  case "$p" in
    tunix)
      [ -x "$peers/tunix/bin/python" ] || "$python" -m venv "$peers/tunix"
      "$peers/tunix/bin/pip" install -q google-tunix==0.1.7 safetensors
      echo "tunix: $peers/tunix/bin/python" ;;
    trl)
      "$python" -m pip install -q --target "$peers/trl-site" --no-deps trl==1.16.0 accelerate==1.15.0
      echo "trl: $peers/trl-site" ;;
    *) echo "unknown peer '$p' (tunix | trl)" >&2; exit 2 ;;
  esac
done
