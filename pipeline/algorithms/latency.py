"""A latency model of a device, NetAdapt-style: the network cut into *units* (the stem, every residual block, the
head), each unit's latency measured once per combination of the widths it can take, and a layout's latency
predicted as the sum of its units' plus a constant (the whole dense graph measured minus its units' sum: session
overhead, the ensemble's average, what fuses across unit borders).

A block unit depends on three widths -- its input stream, its internal (branch) width and its output stream -- so
the budget solver takes it as one factor over those families. A block whose internal width is 0 is its shortcut:
a 1x1 projection (measured) or the identity (free). A unit run alone pays a call overhead (binding its input,
allocating its output) that it does not pay inside the network: each unit's cost is its time minus that of an
empty graph (``noop``) on the same input, so that a unit that vanishes takes exactly its own work with it.

This module builds the units and their stand-alone torch modules (what the latency stage exports and times) and
turns a measured table into the solver's ``Problem``. Pre-activation ResNets (every registry architecture)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch.nn as nn
import torch.nn.functional as F

from .budget import Factor, Problem


@dataclass(frozen=True)
class Unit:
    name: str                                  # module path: members.0.conv1 (stem), members.0.layer2.0, members.0.head
    kind: str                                  # "stem" | "block" | "head"
    families: tuple[int | None, int | None, int | None]   # (in, mid, out) family indices; None = a fixed width
    fixed: tuple[int, int, int]                # the widths a None family stands for
    size: int                                  # input height = width
    stride: int = 1
    shortcut: bool = False                     # a 1x1 projection shortcut (else the identity)
    normalize: bool = False                    # stem: mean/std normalisation before the conv


def network_units(model, families) -> list[Unit]:
    """The stem, blocks and head of every member of a dense pre-activation ResNet ensemble."""
    from models import PreActBlock, PreActResNet

    owner = {}
    for i, fam in enumerate(families):
        for s in fam.slices:
            owner[(id(s.tensor), s.dim)] = i
    units = []
    for mname, member in model.named_modules():
        if not isinstance(member, PreActResNet):
            continue
        size = 32
        stem = member.conv1
        units.append(Unit(f"{mname}.conv1", "stem", (None, None, owner.get((id(stem.weight), 0))),
                          (3, 0, stem.out_channels), size, normalize=not isinstance(member.normalize, nn.Identity)))
        for lname in ("layer1", "layer2", "layer3"):
            for j, block in enumerate(getattr(member, lname)):
                assert isinstance(block, PreActBlock) and block.has_branch, "units of the dense network"
                stride = block.conv1.stride[0]
                units.append(Unit(
                    f"{mname}.{lname}.{j}", "block",
                    tuple(owner.get((id(m.weight), 0)) for m in (block.bn1, block.conv1, block.conv2)),
                    (block.bn1.num_features, block.conv1.out_channels, block.conv2.out_channels),
                    size, stride, block.shortcut is not None))
                size //= stride
        units.append(Unit(f"{mname}.head", "head", (owner.get((id(member.bn.weight), 0)), None, None),
                          (member.bn.num_features, 0, member.linear.out_features), size))
    return units


def signature(unit: Unit, k_in: int, k_mid: int, k_out: int) -> str:
    """What a unit's latency depends on, as a table key."""
    if unit.kind == "stem":
        return f"stem:{unit.size}:{'norm' if unit.normalize else 'raw'}:3-{k_out}"
    if unit.kind == "head":
        return f"head:{unit.size}:{k_in}-{unit.fixed[2]}"
    return f"block:{unit.size}:s{unit.stride}:{'proj' if unit.shortcut else 'id'}:{k_in}-{k_mid}-{k_out}"


def unit_widths(unit: Unit, options: list[list[int]]):
    """Every (k_in, k_mid, k_out) the unit can take, with the option indices of its families."""
    axes = []
    for role, fam in enumerate(unit.families):
        axes.append([(None, unit.fixed[role])] if fam is None else list(enumerate(options[fam])))
    for combo in np.ndindex(*[len(a) for a in axes]):
        yield tuple(axes[r][i][1] for r, i in enumerate(combo)), tuple(axes[r][i][0] for r, i in enumerate(combo))


def noop_signature(unit: Unit, k_in: int) -> str:
    """The empty graph on the unit's input: the call overhead its time includes."""
    channels = 3 if unit.kind == "stem" else k_in
    return f"noop:{channels}x{unit.size}"


def signatures(units: list[Unit], options: list[list[int]]) -> list[str]:
    """Every unit signature the budget can ask for (what the latency stage measures), with the empty graphs on
    their inputs, without duplicates."""
    out = {}
    for unit in units:
        for widths, _ in unit_widths(unit, options):
            if not _free(unit, *widths):
                out[signature(unit, *widths)] = None
                out[noop_signature(unit, widths[0])] = None
    return list(out)


def unit_cost(table: dict[str, float], unit: Unit, k_in: int, k_mid: int, k_out: int) -> float:
    """The unit's share of a network's latency: its measured time less the call overhead (never below 0)."""
    if _free(unit, k_in, k_mid, k_out):
        return 0.0
    return max(table[signature(unit, k_in, k_mid, k_out)] - table[noop_signature(unit, k_in)], 0.0)


def _free(unit: Unit, k_in: int, k_mid: int, k_out: int) -> bool:
    """An identity block without its branch computes nothing."""
    return unit.kind == "block" and k_mid == 0 and not unit.shortcut


class _Head(nn.Module):
    def __init__(self, width: int, classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(width)
        self.linear = nn.Linear(width, classes)

    def forward(self, x):
        return self.linear(F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1).flatten(1))


def unit_module(sig: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A stand-alone module computing the unit a signature names (noise off, random weights), and its input
    shape for batch 1."""
    from models import PreActBlock
    from models.preact_resnet import Normalize

    kind, size, *rest = sig.split(":")
    if kind == "noop":
        channels, size = map(int, size.split("x"))
        return nn.Identity(), (1, channels, size, size)
    size = int(size)
    if kind == "stem":
        norm, widths = rest
        k_out = int(widths.split("-")[1])
        conv = nn.Conv2d(3, k_out, 3, 1, 1, bias=False)
        return (nn.Sequential(Normalize(), conv) if norm == "norm" else conv), (1, 3, size, size)
    if kind == "head":
        k_in, classes = map(int, rest[0].split("-"))
        return _Head(k_in, classes), (1, k_in, size, size)
    stride, shortcut, widths = rest
    k_in, k_mid, k_out = map(int, widths.split("-"))
    block = PreActBlock(k_in, k_out, int(stride[1:]), noise_coef=0.0)
    if shortcut == "proj" and block.shortcut is None:
        block.shortcut = nn.Conv2d(k_in, k_out, 1, int(stride[1:]), bias=False)
    if k_mid == 0:
        block.remove_branch()
    else:
        block.conv1 = nn.Conv2d(k_in, k_mid, 3, int(stride[1:]), 1, bias=False)
        block.bn2 = nn.BatchNorm2d(k_mid)
        block.conv2 = nn.Conv2d(k_mid, k_out, 3, 1, 1, bias=False)
    return block, (1, k_in, size, size)


def latency_problem(units: list[Unit], options: list[list[int]], table: dict[str, float], offset: float) -> Problem:
    """The budget solver's problem: one factor per unit over its families, from the measured ``table``
    (signature -> ms; ``unit_cost``), plus ``offset``."""
    constant, factors = offset, []
    for unit in units:
        scope = tuple(sorted({f for f in unit.families if f is not None}))
        if not scope:
            constant += unit_cost(table, unit, *unit.fixed)
            continue
        grid = np.zeros([len(options[f]) for f in scope])
        for widths, idx in unit_widths(unit, options):
            at = {f: i for f, i in zip(unit.families, idx) if f is not None}
            grid[tuple(at[f] for f in scope)] = unit_cost(table, unit, *widths)
        factors.append(Factor(scope, grid))
    first = {}
    for i, unit in enumerate(units):
        for f in unit.families:
            if f is not None:
                first.setdefault(f, i)
    order = tuple(sorted(range(len(options)), key=lambda f: first.get(f, len(units))))
    return Problem(options, factors, constant, order)
