#!/usr/bin/env bash
# Issue 17 on a lent GPU machine, as one script (results go to $OUT, or ./gpu_results): the scan
# tests in bf16 on the GPU, then tools/bench_gpu.py (about 7 minutes on an H200).
# Runs from the repository root with the machine's own python3 + torch (+ the triton CUDA PyTorch brings).
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} | tee "$OUT/device.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_accel.py -k "gpu or cuda" -rs 2>&1 \
  | tee "$OUT/pytest_scan_gpu.txt" | tail -8
timeout 480 python3 tools/bench_gpu.py --budget-s 400 --out "$OUT/bench_gpu_h200.json" 2>&1 | grep -v Warn | tail -45
