#!/usr/bin/env bash
# Table 2 on a lent GPU machine (results go to $OUT, or ./gpu_results): one block's forward +
# backward time and peak memory vs sequence length 256..8192, batch 16, width 512, bf16.
# Runs from the repository root with the machine's own python3 + torch; nothing is installed.
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')
python3 -c "import mamba_ssm" > "$OUT/mamba_ssm.txt" 2>&1 && echo "mamba-ssm importable" || echo "mamba-ssm not importable: PyTorch scan"
timeout 420 python3 tools/bench_scaling.py --gpu --reps 5 --out "$OUT/bench_scaling_${gpu}.json" 2>&1 | grep -v Warn | tail -12
