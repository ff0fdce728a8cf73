#!/usr/bin/env bash
# Table 1 at the paper's full configuration (width 512, 6 layers, vocab 10k, block 256, batch 32,
# 5 epochs, fp32, the paper recipe; configs/paper/wikitext2.yaml + gpu.yaml) on the linux_doc
# stand-in, one seed, on a lent GPU machine. Results go to $OUT (or ./gpu_results).
#
# The device has neither the Debian package nor the internet, so prep the stand-in here first and
# carry the folder it prints (about 30 MB):
#     python -m gam_pretrain paper table1 --scale gpu --recipe paper --prep-only
#     device run: command "bash tools/gpu_paper.sh", carry ["runs/data/linux_doc-<key>"], timeout_s 600
# Rows: GAM and the naive Transformer (about 20M tokens each; a few minutes each on an H200 in fp32).
# The paper-stack Mamba row is left out: mamba-ssm is not installed on the device (no internet) and
# this project's PyTorch scan is too slow on a GPU to train 20M tokens in the time a session has.
# Each row runs under its own time limit, so one slow row cannot starve the other; a row that
# does not finish is missing from the table (its log says how far it got).
# SMOKE=1: the same commands at smoke scale on a CPU (checks the script; the numbers mean nothing).
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
scale=gpu; limit=270
if [ "${SMOKE:-0}" = 1 ]; then scale=smoke; limit=300; fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
} | tee "$OUT/device.txt"
for model in gam transformer-naive; do
  timeout -s INT "$limit" python3 -m gam_pretrain paper table1 --scale "$scale" --recipe paper --seeds 1 \
    --model "$model" --out "$OUT/paper-$scale" > "$OUT/$model.log" 2>&1
  echo "$model: exit $?"; tail -2 "$OUT/$model.log"
done
# the table of every row that finished (finished rows are read back, not retrained)
finished=()
for model in gam transformer-naive; do
  [ -f "$OUT/paper-$scale/seed1/wikitext2-$model/summary.json" ] && finished+=(--model "$model")
done
[ ${#finished[@]} -gt 0 ] && python3 -m gam_pretrain paper table1 --scale "$scale" --recipe paper --seeds 1 \
  "${finished[@]}" --out "$OUT/paper-$scale" 2>&1 | tail -12
# what comes back (the device returns files at most a few folders deep): the table with every row's
# numbers, each row's log, and its metrics and summary copied up from the run folders
for model in gam transformer-naive; do
  run="$OUT/paper-$scale/seed1/wikitext2-$model"
  for f in summary.json metrics.jsonl; do [ -f "$run/$f" ] && cp "$run/$f" "$OUT/$model-$f"; done
done
rm -rf "$OUT"/paper-"$scale"/seed*
