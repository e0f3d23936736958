"""The stages, in order. Each module defines ``STAGE``."""
from . import bench, evaluate, export, finetune, latency, mobile, prune, qeval, quantize, surgery, train, transfer

STAGES = [train.STAGE, latency.STAGE, prune.STAGE, surgery.STAGE, finetune.STAGE, evaluate.STAGE, export.STAGE,
          quantize.STAGE, mobile.STAGE, transfer.STAGE, qeval.STAGE, bench.STAGE]
