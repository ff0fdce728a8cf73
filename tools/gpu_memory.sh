#!/usr/bin/env bash
# Issue 15's GPU memory ladder on a lent GPU machine, as one script (results go to $OUT, or ./gpu_results):
# the largest GAM of the ladder per engine on one device, bf16, within the device's memory.
# DeepSpeed configs need its wheels in .whl/ (carried; see tools/gpu_engines.sh); without them only
# the torch engines run. About 5 minutes (--budget-s stops starting configs after 270 s).
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
CONFIGS="ddp ddp+ac fsdp2+ac"
if ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; then
  export PYTHONPATH=/tmp/site:$PWD
  CONFIGS="$CONFIGS zero3+offload"
fi
python3 -c "import psutil" 2>/dev/null || { echo "psutil missing: the watcher needs it"; exit 1; }
timeout 560 python3 tools/bench_memory.py --gpu --configs $CONFIGS --start-width 2048 --width-step 256 --budget-s 270 \
  --out "$OUT/bench_memory_h200.json" 2>&1 | grep -v Warn | tail -30
