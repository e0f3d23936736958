#!/usr/bin/env bash
# Issue 10's GPU check in one call: the CUDA-only tests, then the training-step throughput table (baseline and
# every variant in the same process, card and torch version printed). Synthetic data: nothing to carry.
#
#   device tool:  run(command="bash benchmarks/gpu_train_step.sh", timeout_s=540)
#   by hand:      OUT=/tmp/out bash benchmarks/gpu_train_step.sh
#
# Budget (H200, estimated from the probe figures): tests ~1 min, En5 tables ~4 min, ResNet20 ~1 min.
# Each part has its own timeout, so one that hangs leaves the others' logs in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/gpu_train_step}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/card.txt"
"$PY" -c "import pipeline.cli" || { echo "cannot import the pipeline here (a missing package?)"; exit 3; }

timeout 150 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda_graphs.py 2>&1 | tee "$OUT/tests.log"

# En5ResNet20, PGD-10, the paper's batch 128 and the larger 512 (targets: >= 2,500 and >= 5,000 img/s)
timeout 270 "$PY" -m pipeline.cli bench-train --variants --device cuda \
    --config configs/paper/en5resnet20_rgsm.toml --batches 128,512 --precisions fp32,bf16 \
    --impls members,grouped --channels-last true --cuda-graphs false,true --steps 10 --warmup 5 \
    2>&1 | tee "$OUT/en5resnet20.log"

# The prune stage's step: the same with RGSM's regularize + pull after every step (half of the paper recipe)
timeout 120 "$PY" -m pipeline.cli bench-train --variants --prune-step --device cuda \
    --config configs/paper/en5resnet20_rgsm.toml --batches 128 --precisions fp32,bf16 \
    --impls members,grouped --channels-last true --cuda-graphs false,true --steps 10 --warmup 5 \
    2>&1 | tee "$OUT/en5resnet20_prune_step.log"

# ResNet20 (target at batch 128: >= 5,000 img/s)
timeout 90 "$PY" -m pipeline.cli bench-train --variants --device cuda \
    --config configs/paper/resnet20_rgsm.toml --batches 128,1024 --precisions fp32,bf16 \
    --impls members --channels-last true --cuda-graphs false,true --steps 10 --warmup 5 \
    2>&1 | tee "$OUT/resnet20.log"
