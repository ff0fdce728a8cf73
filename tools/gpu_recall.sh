#!/usr/bin/env bash
# Associative recall on a lent GPU (results to $OUT): GAM, the Transformer and GAM-Assoc at T = 128
# and 256 with 4/8/16 pairs (heads of 64, the diagnostics default), trained long enough to separate
# (2000 steps; issue 19's longer runs);
# Mamba is left out here because our PyTorch scan is launch-bound on a GPU.
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
timeout 540 python3 tools/diagnostics.py --steps 2000 --families gam,transformer,gam-assoc --device cuda \
  --seq-lens 128,256 --pairs 4,8,16 \
  --out "$OUT/diagnostics_recall_${gpu}.json" 2>&1 | grep -v Warn | tail -14
