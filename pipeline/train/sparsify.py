"""The prune stage's sparsifier, built from the config through the sparsifier table (pipeline/catalog): on the
paper's groups (every conv's input channels, stem and 1x1 shortcuts included), on coupled removable channels
(cost-scaled lambdas, widths kept at a multiple of the hardware block), or on every conv kernel."""
from __future__ import annotations

import torch

from ..algorithms.budget import cost_problem, grid_step, network_layers, vanishing_families
from ..algorithms.groups import coupled_families, group_costs, paper_families
from ..catalog.sparsifiers import SPARSIFIERS
from ..core.errors import UserError
from ..devices.hardware import resolve_align


# The budget's widths are multiples of max(align, BUDGET_GRID): the exact solve grows fast with finer grids
# (ResNet20, one solve: align 16 ~2 ms, 8 ~10 ms, 4 ~0.1 s, 1 ~30 s) and runs at every training step.
BUDGET_GRID = 8


def allowed_widths(model, families, align: int) -> list[list[int]]:
    """Per coupled family, the widths a budget may choose: multiples of max(align, BUDGET_GRID) (never below
    it), the dense width, and 0 for a block-internal family (its residual branch goes whole: depth pruning)."""
    vanish = vanishing_families(model, families)
    # at most ~16 widths per family (grid_step coarsens the grid of a wide one): ResNet20's grid is unchanged,
    # ResNet18's 512-wide stages would otherwise make every solve take seconds
    steps = [grid_step(f.width, max(align, BUDGET_GRID)) for f in families]
    return [sorted({*range(s, f.width + 1, s), f.width} | ({0} if i in vanish else set()))
            for i, (f, s) in enumerate(zip(families, steps))]


def make_budget(model, families, example, prune, align: int, latency_table=None):
    """The cost model and limit of ``prune.budget``: MACs or parameters counted from the network, or the
    latency table the latency stage measured on the budget device (its table.json)."""
    from ..algorithms.rgsm import Budget

    options = allowed_widths(model, families, align)
    layers = network_layers(model, families, example)
    if prune.budget == "latency":
        from ..algorithms.latency import latency_problem, network_units

        problem = latency_problem(network_units(model, families), options, latency_table["units"],
                                  latency_table["offset_ms"])
    else:
        problem = cost_problem(layers, options, prune.budget)
    dense = problem.cost(problem.dense_choice())
    limit = dense / prune.target
    smallest = problem.cost([0] * len(options))
    if smallest > limit:
        raise UserError(f"prune.target = {prune.target:g} cannot be met: the narrowest layout the widths allow "
                        f"(align {align}, one block per family) costs {smallest:.4g} {prune.budget}, dense "
                        f"{dense:.4g} (at most {dense / smallest:.3g}x less); lower prune.target or prune.align")
    return Budget(problem, limit, dense, prune.budget)


def make_sparsifier(model, prune, *, seed: int, device, latency_table=None, image_shape=(3, 32, 32)):
    """The sparsifier ``prune.method`` names (``prune``: the [prune] section), bound to ``model``'s weights."""
    entry = SPARSIFIERS[prune.method]
    cls, kwargs = entry.load(), prune.settings.kwargs()
    if entry.meta["groups"] == "kernels":
        return cls([f.slices[0].tensor for f in paper_families(model)], **kwargs)
    if prune.groups == "paper":
        return cls(paper_families(model), **kwargs)
    align = resolve_align(prune.align)
    example = torch.rand(2, *image_shape, generator=torch.Generator().manual_seed(seed)).to(device)
    # min_keep = align: a family never drops below one block, so no layer reaches width 0 and surgery never
    # has to keep a zero channel for shape (which would break the alignment).
    families = coupled_families(model, example)
    extra = {} if prune.budget == "none" else {
        "budget": make_budget(model, families, example, prune, align, latency_table),
        "budget_every": prune.budget_every}
    return cls(families, **kwargs, align=align, min_keep=align,
               scales=group_costs(model, families, example, prune.group_cost), **extra)


def describe(sparsifier, prune) -> str:
    """One log line: what the sparsifier does, on which groups."""
    text = sparsifier.describe() if hasattr(sparsifier, "describe") else type(sparsifier).__name__
    if SPARSIFIERS[prune.method].meta["groups"] == "families":
        cost = f", lambda1 priced by {prune.group_cost}" if prune.groups == "coupled" and prune.budget == "none" \
            else ""
        text += f"; {prune.groups} groups{cost}"
    return text
