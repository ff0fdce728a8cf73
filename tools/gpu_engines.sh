#!/usr/bin/env bash
# The bf16 path of every engine on one GPU (torchrun, 1 rank, nccl), for a lent GPU machine. With one
# rank, engine.kind=ddp runs as the single engine (DDP of one process is that engine).
# Needs deepspeed and its pure-Python deps as wheels in .whl/ (see the device tool's notes).
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled PYTHONWARNINGS=ignore
python3 -m gam_pretrain prep embedded --out /tmp/gpu-data --prep.block_size 128 --workers 8 --progress false | tail -2
for E in ddp zero1 zero2 zero3 fsdp2; do
  case $E in
    ddp) ENG="engine.kind=ddp" ;;
    fsdp2) ENG="engine.kind=fsdp2" ;;
    *) ENG="engine.kind=deepspeed engine.zero_stage=${E#zero}" ;;
  esac
  timeout 150 torchrun --nproc_per_node 1 -m gam_pretrain train --config configs/quickstart.yaml data.dir=/tmp/gpu-data \
    $ENG train.precision=bf16 train.max_steps=100 train.eval_batches=20 train.progress=false logging.wandb=disabled \
    train.peak_flops=989e12 train.out_dir=/tmp/gpu-runs train.run_name=$E > "$OUT/train_$E.log" 2>&1
  echo "$E exit $?"
  python3 -c "import json,sys; s=json.load(open('/tmp/gpu-runs/$E/summary.json')); s.pop('loss_curve'); print(json.dumps(s))" \
    > "$OUT/summary_$E.json" 2>/dev/null && cat "$OUT/summary_$E.json" | cut -c1-400 || tail -5 "$OUT/train_$E.log"
done
