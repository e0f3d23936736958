"""Architecture descriptions that survive channel removal without pickling modules.

A description is plain JSON: the registry name, its kwargs, and the shape of every conv/BN/linear that
differs from the registry's dense build (``null`` for one that was removed: a residual branch pruned away).
Rebuilding resizes (or removes) those modules, then ``load_state_dict`` fills them.
"""
from __future__ import annotations

import torch.nn as nn

from .registry import create_model


def _dims(m: nn.Module):
    if isinstance(m, nn.Conv2d):
        return [m.in_channels, m.out_channels]
    if isinstance(m, nn.BatchNorm2d):
        return [m.num_features]
    if isinstance(m, nn.Linear):
        return [m.in_features, m.out_features]
    return None


def describe(model: nn.Module, arch: str, kwargs: dict) -> dict:
    dense = create_model(arch, **kwargs)
    dense_dims = {n: _dims(m) for n, m in dense.named_modules()}
    present = dict(model.named_modules())
    shapes = {}
    for name, d in dense_dims.items():
        if d is None:
            continue
        if name not in present:
            shapes[name] = None
        elif _dims(present[name]) != d:
            shapes[name] = _dims(present[name])
    return {"arch": arch, "kwargs": dict(kwargs), "shapes": shapes}


def _resized(m: nn.Module, dims):
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d(dims[0], dims[1], m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                         bias=m.bias is not None)
    if isinstance(m, nn.BatchNorm2d):
        return nn.BatchNorm2d(dims[0], m.eps, m.momentum, m.affine, m.track_running_stats)
    if isinstance(m, nn.Linear):
        return nn.Linear(dims[0], dims[1], bias=m.bias is not None)
    raise TypeError(f"cannot resize {type(m).__name__}")


def build_from_description(desc: dict) -> nn.Module:
    model = create_model(desc["arch"], **desc["kwargs"])
    for name, dims in desc["shapes"].items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, None if dims is None else _resized(getattr(parent, attr), dims))
    return model
