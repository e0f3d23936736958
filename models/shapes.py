"""Architecture descriptions that survive channel removal without pickling modules.

A description is plain JSON: the architecture (a registry name, or ``package.module:function`` for the user's own
builder), its kwargs, and the shape of every conv/BN/linear that differs from the dense build (``null`` for one that
was removed: a residual branch pruned away). Rebuilding calls the same ``create_model(arch, **kwargs)`` -- for an
external builder too: the description holds the builder's path and kwargs, never the module -- then resizes (or
removes) those modules, and ``load_state_dict`` fills them. So a saved model loads with
``torch.load(..., weights_only=True)``: no pickled module, no code run on load beyond the builder the config names.

Resizing keeps a layer's kind: a depthwise conv (groups == in == out) stays depthwise at its new width; a grouped
conv that is not depthwise cannot change width (ValueError; surgery never narrows one).
"""
from __future__ import annotations

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .registry import create_model

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _dims(m: nn.Module):
    if isinstance(m, _CONVS):
        return [m.in_channels, m.out_channels]
    if isinstance(m, _BatchNorm):
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


def _resized(m: nn.Module, dims, name: str = "?"):
    if isinstance(m, _CONVS):
        groups = m.groups
        if groups != 1:
            if not groups == m.in_channels == m.out_channels:
                raise ValueError(f"{name}: cannot resize a grouped conv ({m.in_channels} -> {m.out_channels} "
                                 f"channels in {groups} groups) to {dims}: only depthwise and ungrouped convs change "
                                 "width")
            if dims[0] != dims[1]:
                raise ValueError(f"{name}: a depthwise conv has as many outputs as inputs, got {dims}")
            groups = dims[0]   # stays depthwise: one filter per remaining channel
        return type(m)(dims[0], dims[1], m.kernel_size, m.stride, m.padding, m.dilation, groups,
                       bias=m.bias is not None, padding_mode=m.padding_mode)
    if isinstance(m, _BatchNorm):
        return type(m)(dims[0], m.eps, m.momentum, m.affine, m.track_running_stats)
    if isinstance(m, nn.Linear):
        return nn.Linear(dims[0], dims[1], bias=m.bias is not None)
    raise TypeError(f"{name}: cannot resize {type(m).__name__}")


def build_from_description(desc: dict) -> nn.Module:
    model = create_model(desc["arch"], **desc["kwargs"])
    for name, dims in desc["shapes"].items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, None if dims is None else _resized(getattr(parent, attr), dims, name))
    return model
