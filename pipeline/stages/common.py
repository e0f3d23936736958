"""What several stages share: data splits, device, seeding."""
from __future__ import annotations

import functools
import random

import torch

from ..config import RunConfig
from ..data import Split, load_cifar10, train_val_split


@functools.lru_cache(maxsize=2)
def _cifar(root: str, download: bool):
    return load_cifar10(root, download)


def data_splits(cfg: RunConfig) -> tuple[Split, Split, Split]:
    """(train, val, test) exactly as the config defines them; val is held out of the training set."""
    d = cfg.data
    train_full, test = _cifar(d.root, d.download)
    train, val = train_val_split(train_full, d.val_size, d.split_seed)
    train = train.subset(d.train_subset, d.split_seed + 1)
    test = test.subset(d.test_subset, d.split_seed + 2)
    return train, val, test


def device_of(cfg: RunConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device = 'cuda' but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def model_kwargs(cfg: RunConfig) -> dict:
    kwargs = {"ensemble": cfg.model.ensemble, "noise_coef": cfg.model.noise_coef}
    if not cfg.model.normalize:   # only when off, so descriptions written before the switch existed still match
        kwargs["normalize"] = False
    return kwargs
