"""The stages, in order. Each module defines ``STAGE``."""
from . import bench, evaluate, export, prune, quantize, surgery, train, transfer

STAGES = [train.STAGE, prune.STAGE, surgery.STAGE, evaluate.STAGE, export.STAGE, quantize.STAGE, transfer.STAGE, bench.STAGE]
