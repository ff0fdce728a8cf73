#!/usr/bin/env bash
# The GPU-only checks, as one script for a lent GPU machine (results go to $OUT, or ./gpu_results).
# Runs from the repository root with the machine's own python3 + torch; nothing is installed.
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  python3 -c "import mamba_ssm" 2>&1 | tail -1
} | tee "$OUT/device.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_accel.py tests/test_models.py -k "gpu or cuda or bf16 or flash" -rs 2>&1 \
  | tee "$OUT/pytest_gpu.txt" | tail -15
python3 tools/bench_models.py --batch 16 --seq 256 --steps 10 --models gam,transformer-sdpa,mamba-standard --accels none,compile --skip gam:none,transformer-sdpa:none --out "$OUT/bench_models_gpu.json" 2>&1 | grep -v Warn | tail -10
python3 -m gam_pretrain train --config configs/quickstart.yaml model.arch=gam train.max_steps=200 \
  logging.wandb=disabled train.progress=false train.run_name=gam train.out_dir="$OUT/runs" data.cache_dir=/tmp/gp-data 2>&1 | tail -3
python3 -c "import json; s=json.load(open('$OUT/runs/gam/summary.json')); s.pop('loss_curve'); print(s)" | tee "$OUT/train_summary.txt"
