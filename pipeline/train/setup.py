"""What every stage that touches data or models shares: the data splits and evaluated test images exactly as the
config defines them, the torch device, seeding, and the model's build arguments. The config is read as values
(the stage key hashes it), never imported."""
from __future__ import annotations

import functools
import random

import torch

from ..core import seeds
from .data import FIXED_INFO, DatasetInfo, Split, load_dataset, resolve_root, to_float, train_val_split


@functools.lru_cache(maxsize=2)
def _dataset(dataset: str, root: str, download: bool, image_size: int):
    return load_dataset(dataset, root, download, image_size)


def _loaded(cfg):
    """(train, test, info) of the config's dataset, loaded once per process."""
    d = cfg.data
    # keyed by what the root resolves to now ($PIPELINE_DATA_ROOT, the home folder), not by the setting
    return _dataset(d.dataset, str(resolve_root(d.root, d.dataset)), d.download, d.image_size)


def data_splits(cfg) -> tuple[Split, Split, Split]:
    """(train, val, test) exactly as the config defines them; val is held out of the training set."""
    d = cfg.data
    train_full, test, _ = _loaded(cfg)
    train, val = train_val_split(train_full, d.val_size, d.split_seed)
    train = train.subset(d.train_subset, d.split_seed + seeds.TRAIN_SUBSET)
    test = test.subset(d.test_subset, d.split_seed + seeds.TEST_SUBSET)
    return train, val, test


def data_info(cfg) -> DatasetInfo:
    """Name, class count, (C, H, W) and class names of the config's dataset. CIFAR-10, CIFAR-100 and SVHN are known
    without reading a file (so stages that only build a model need no data); imagefolder and npz are read (once:
    the loaded data is cached with the splits)."""
    return FIXED_INFO.get(cfg.data.dataset) or _loaded(cfg)[2]


def validation_split(cfg, val: Split) -> Split:
    """The validation images the training stages score every epoch (train.val_subset of the split)."""
    return val.subset(cfg.train.val_subset, cfg.data.split_seed + seeds.VAL_SUBSET)


def eval_images(cfg):
    """The evaluated test images (float, [0, 1]) and labels: data.test_subset, then a seeded eval.images subset."""
    _, _, test = data_splits(cfg)
    test = test.subset(cfg.eval.images, cfg.data.split_seed + seeds.EVAL_SUBSET)
    return to_float(test.images), test.labels, test


def device_of(cfg) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device = 'cuda' but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing on a GPU); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def build_model(cfg):
    """The config's network, freshly initialised: the registry's dense build, or with ``model.widths`` the thin
    network of those per-layer widths (a module listed with [] removed: a residual branch)."""
    from models import build_from_description, create_model

    if not cfg.model.widths:
        return create_model(cfg.model.arch, **model_kwargs(cfg))
    return build_from_description(description_of_widths(cfg.model.arch, model_kwargs(cfg), cfg.model.widths))


def description_of_widths(arch: str, kwargs: dict, widths: dict) -> dict:
    """``model.widths`` as the architecture description models/shapes.py rebuilds ([] = removed)."""
    return {"arch": arch, "kwargs": dict(kwargs), "shapes": {k: (list(v) if v else None) for k, v in widths.items()}}


def image_shape(cfg) -> tuple[int, int, int]:
    """(C, H, W) of the config's images, from the data."""
    return tuple(data_info(cfg).shape)


def model_kwargs(cfg) -> dict:
    """The builder's keyword arguments, as the model description records them. A registry model gets ensemble,
    noise_coef (and normalize, num_classes, in_channels where they differ from the CIFAR-10 defaults, so that
    descriptions written before those existed still match) plus model.kwargs; the user's builder gets model.kwargs
    and num_classes when its signature takes it."""
    from models import builder_kwargs, is_external

    info = data_info(cfg)
    if is_external(cfg.model.arch):
        return builder_kwargs(cfg.model.arch, cfg.model.kwargs, info.num_classes)
    kwargs = {"ensemble": cfg.model.ensemble, "noise_coef": cfg.model.noise_coef}
    if not cfg.model.normalize:   # only when off, so descriptions written before the switch existed still match
        kwargs["normalize"] = False
    if info.num_classes != 10:
        kwargs["num_classes"] = info.num_classes
    if info.shape[0] != 3:
        kwargs["in_channels"] = info.shape[0]
    return {**kwargs, **cfg.model.kwargs}
