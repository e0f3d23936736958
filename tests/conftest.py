"""Shared test setup: where CIFAR-10 lives, and a single torch thread for the tiny test models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
DATA_ROOT_ENV = "PIPELINE_DATA_ROOT"

# The checkout's sibling shared/ folder holds the real CIFAR-10 files on the dev machines; CI sets the
# environment variable itself, and setdefault never overrides it.
_LOCAL_CIFAR = REPO.parent / "shared" / "data" / "cifar10"
if _LOCAL_CIFAR.is_dir():
    os.environ.setdefault(DATA_ROOT_ENV, str(_LOCAL_CIFAR))

# The test models are tiny: extra intra-op threads only add contention (badly so on a shared 2-core box).
torch.set_num_threads(int(os.environ.get("PIPELINE_TEST_THREADS", "1")))


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """The folder holding ``cifar-10-batches-py``. Missing data fails under CI=true and skips elsewhere."""
    root = os.environ.get(DATA_ROOT_ENV, "")
    path = Path(root).expanduser() if root else None
    if path is None or not (path / "cifar-10-batches-py").is_dir():
        msg = (f"CIFAR-10 not found: set ${DATA_ROOT_ENV} to a folder holding cifar-10-batches-py "
               f"(got {root!r})")
        if _ci():
            pytest.fail(msg)
        pytest.skip(msg)
    return path
