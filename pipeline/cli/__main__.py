"""``python -m pipeline.cli``: what torchrun starts on every rank (``pipeline run --nproc N``)."""
import sys

from . import main

sys.exit(main())
