"""The prune stage's sparsifier, built from the config through the sparsifier table (pipeline/catalog): on the
paper's groups (every conv's input channels, stem and 1x1 shortcuts included), on coupled removable channels
(cost-scaled lambdas, widths kept at a multiple of the hardware block), or on every conv kernel."""
from __future__ import annotations

import torch

from ..algorithms.groups import coupled_families, group_costs, paper_families
from ..catalog.sparsifiers import SPARSIFIERS
from ..devices.hardware import resolve_align


def make_sparsifier(model, prune, *, seed: int, device):
    """The sparsifier ``prune.method`` names (``prune``: the [prune] section), bound to ``model``'s weights."""
    entry = SPARSIFIERS[prune.method]
    cls, kwargs = entry.load(), prune.settings.kwargs()
    if entry.meta["groups"] == "kernels":
        return cls([f.slices[0].tensor for f in paper_families(model)], **kwargs)
    if prune.groups == "paper":
        return cls(paper_families(model), **kwargs)
    align = resolve_align(prune.align)
    example = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(device)
    # min_keep = align: a family never drops below one block, so no layer reaches width 0 and surgery never
    # has to keep a zero channel for shape (which would break the alignment).
    families = coupled_families(model, example)
    return cls(families, **kwargs, align=align, min_keep=align,
               scales=group_costs(model, families, example, prune.group_cost))


def describe(sparsifier, prune) -> str:
    """One log line: what the sparsifier does, on which groups."""
    text = sparsifier.describe() if hasattr(sparsifier, "describe") else type(sparsifier).__name__
    if SPARSIFIERS[prune.method].meta["groups"] == "families":
        cost = f", lambda1 priced by {prune.group_cost}" if prune.groups == "coupled" else ""
        text += f"; {prune.groups} groups{cost}"
    return text
