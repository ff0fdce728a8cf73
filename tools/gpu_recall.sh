#!/usr/bin/env bash
# Associative recall on a lent GPU (results to $OUT): GAM and the Transformer trained long enough
# to separate (3000 steps); Mamba is left out here because our PyTorch scan is launch-bound on a GPU.
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
timeout 500 python3 tools/diagnostics.py --steps 3000 --families gam,transformer --device cuda --pairs 4,8,16 \
  --out "$OUT/diagnostics_recall_${gpu}.json" 2>&1 | grep -v Warn | tail -14
