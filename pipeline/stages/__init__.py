"""The five stages, in order. Each module defines ``STAGE``."""
from . import bench, export, prune, surgery, train

STAGES = [train.STAGE, prune.STAGE, surgery.STAGE, export.STAGE, bench.STAGE]
