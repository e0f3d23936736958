"""Pruning to a budget: the widths of every channel family that remove the least weight energy while the pruned
network's cost (MACs, parameters or a device's latency) stays within a limit.

The problem, for families f with allowed widths K_f (multiples of the hardware block, the dense width, and 0 for a
block-internal family whose whole residual branch may go):

    minimise  Σ_f loss_f(k_f)      subject to    Σ_j cost_j(k_{S_j}) <= limit,

where loss_f(k) = (beta/2)·(sum of the n_f - k smallest squared group norms of f) -- what RGSM's hard prox pays
for dropping groups, so for a fixed width the kept groups are the k largest -- and the cost is a sum of *factors*,
each a table over the widths of a few families S_j: a conv's MACs are k_in·k_out·(kernel·positions), a block's
measured latency depends on its input, internal and output widths.

The solver is exact: dynamic programming over the families in network order, keeping for every assignment of the
families that still share a factor with a family to come (two residual streams at most in a ResNet) the Pareto set
of (cost so far, loss so far), pruned by a lower bound on the cost still to come. A Lagrangian bisection on a
single lambda would be cheaper, but a knapsack over discrete widths has a duality gap: it can miss the best layout,
or land well inside the budget. Here the answer is the cheapest-loss layout that meets the budget
(tests/test_budget.py checks it against brute force), and it moves smoothly with the target -- no lambda cliff.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Factor:
    """A cost term over the widths of the families ``scope``: ``table[i_1, ..., i_m]`` is its cost when family
    ``scope[j]`` takes its option ``i_j`` (an index into that family's allowed widths)."""
    scope: tuple[int, ...]
    table: np.ndarray


@dataclass(frozen=True)
class Problem:
    options: list[list[int]]      # per family, its allowed widths (ascending)
    factors: list[Factor]
    constant: float = 0.0         # cost that no family's width changes
    order: tuple[int, ...] = ()   # the order the solver takes the families in (network order); () = as given

    def cost(self, choice: list[int]) -> float:
        """Total cost of a layout given as one option index per family."""
        return self.constant + sum(float(f.table[tuple(choice[s] for s in f.scope)]) for f in self.factors)

    def widths(self, choice: list[int]) -> list[int]:
        return [self.options[f][i] for f, i in enumerate(choice)]

    def dense_choice(self) -> list[int]:
        return [len(o) - 1 for o in self.options]


def group_loss(sq_norms: np.ndarray, widths: list[int], beta: float) -> np.ndarray:
    """loss(k) for each allowed width k: (beta/2)·(sum of the n - k smallest squared norms)."""
    s = np.sort(np.asarray(sq_norms, dtype=np.float64))            # ascending
    dropped = np.concatenate([[0.0], np.cumsum(s)])                 # dropped[m] = sum of the m smallest
    n = len(s)
    return 0.5 * beta * np.array([dropped[n - k] for k in widths])


def _pareto(cost: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats in both (cost lower or equal, loss lower), cheapest first."""
    order = np.lexsort((loss, cost))
    best = np.minimum.accumulate(loss[order])
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = loss[order][1:] < best[:-1]
    return order[keep]


def solve(problem: Problem, losses: list[np.ndarray], limit: float, *, max_points: int = 4096) -> list[int] | None:
    """The option index per family of the least-loss layout with cost <= ``limit``; None if none fits.

    ``max_points`` bounds each Pareto set (a set above it is thinned to that many points spread over its cost
    range; never reached on ResNet-sized problems with aligned widths, and the result still meets the limit)."""
    n = len(problem.options)
    if problem.order and list(problem.order) != list(range(n)):
        # relabel the families in solving order, solve, map back
        order = list(problem.order)
        rank = {f: i for i, f in enumerate(order)}
        relabelled = Problem([problem.options[f] for f in order], [
            Factor(tuple(sorted(rank[f] for f in fac.scope)),
                   np.transpose(fac.table, np.argsort([rank[f] for f in fac.scope])) if fac.scope else fac.table)
            for fac in problem.factors], problem.constant)
        choice = solve(relabelled, [losses[f] for f in order], limit, max_points=max_points)
        return None if choice is None else [choice[rank[f]] for f in range(n)]
    last = [max((max(fac.scope) for fac in problem.factors if f in fac.scope), default=f) for f in range(n)]
    done_at = [[fac for fac in problem.factors if max(fac.scope, default=-1) == f] for f in range(n)]
    # a lower bound on the cost still to come after each step: every later factor at its cheapest
    min_after = np.zeros(n + 1)
    for f in range(n - 1, -1, -1):
        min_after[f] = min_after[f + 1] + sum(float(fac.table.min()) for fac in done_at[f])
    constant_free = [fac for fac in problem.factors if not fac.scope]
    start = problem.constant + sum(float(fac.table) for fac in constant_free)
    # states: active families (option indices, in family order) -> (cost, loss, back) arrays
    states = {(): (np.array([start]), np.array([0.0]), [None])}
    active: tuple[int, ...] = ()
    history = []
    for f in range(n):
        after = tuple(g for g in (*active, f) if last[g] > f)
        grouped: dict[tuple, list] = {}
        for key, (cost, loss, _) in states.items():
            assigned = dict(zip(active, key))
            for i in range(len(problem.options[f])):
                assigned[f] = i
                add = sum(float(fac.table[tuple(assigned[s] for s in fac.scope)]) for fac in done_at[f])
                c = cost + add
                ok = c + min_after[f + 1] <= limit * (1 + 1e-12)
                if not ok.any():
                    continue
                idx = np.nonzero(ok)[0]
                new_key = tuple(assigned[g] for g in after)
                grouped.setdefault(new_key, []).append((c[idx], loss[idx] + losses[f][i], key, idx, i))
        new_states = {}
        for new_key, parts in grouped.items():
            c = np.concatenate([p[0] for p in parts])
            l_ = np.concatenate([p[1] for p in parts])
            back = [(p[2], j, p[4]) for p in parts for j in p[3]]
            keep = _pareto(c, l_)
            if len(keep) > max_points:
                keep = keep[np.linspace(0, len(keep) - 1, max_points).round().astype(int)]
            new_states[new_key] = (c[keep], l_[keep], [back[k] for k in keep])
        history.append(new_states)
        states, active = new_states, after
        if not states:
            return None
    (cost, loss, back), = states.values()
    best = int(np.argmin(loss))
    choice = [0] * n
    key, j = (), best
    for f in range(n - 1, -1, -1):
        prev_key, prev_j, i = history[f][key][2][j]
        choice[f] = i
        key, j = prev_key, prev_j
    return choice


# ---------------------------------------------------------------------------------------------- cost of a network
@dataclass(frozen=True)
class Layer:
    """A conv, BN or linear layer as the cost model sees it: which family sets its input and output width (None:
    fixed at ``in_fixed``/``out_fixed``), how many output positions it has, and the family whose vanishing (width
    0: the residual branch removed) takes it away even though its own widths are not that family's."""
    name: str
    kind: str                   # "conv" | "bn" | "linear"
    in_family: int | None
    out_family: int | None
    in_fixed: int
    out_fixed: int
    kernel: int = 1             # kh * kw
    positions: int = 1          # output positions per image (BN: its input's)
    bias: bool = False
    vanish_with: int | None = None


def network_layers(model, families, example) -> list[Layer]:
    """The conv/BN/linear layers of ``model`` with the ``families`` (ChannelFamily list) that set their widths."""
    import torch.nn as nn

    from .groups import output_positions

    owner = {}
    for i, fam in enumerate(families):
        for s in fam.slices:
            owner[(id(s.tensor), s.dim)] = i
    positions = output_positions(model, example)
    vanish = vanishing_modules(model, families)
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight
            layers.append(Layer(name, "conv", owner.get((id(w), 1)), owner.get((id(w), 0)), m.in_channels // m.groups,
                                m.out_channels, m.kernel_size[0] * m.kernel_size[1], positions[name],
                                m.bias is not None, vanish.get(name)))
        elif isinstance(m, nn.BatchNorm2d):
            fam = owner.get((id(m.weight), 0))
            layers.append(Layer(name, "bn", fam, fam, m.num_features, m.num_features, 1, positions[name],
                                False, vanish.get(name)))
        elif isinstance(m, nn.Linear):
            layers.append(Layer(name, "linear", owner.get((id(m.weight), 1)), None, m.in_features, m.out_features,
                                bias=m.bias is not None, vanish_with=vanish.get(name)))
    return layers


def vanishing_modules(model, families) -> dict[str, int]:
    """Module name -> the family whose width 0 removes it: for the pre-activation blocks, the internal family
    (rooted at ``conv1``) takes conv1, bn2 and conv2 with it, and bn1 too when the shortcut is the identity."""
    from models import PreActBlock

    out = {}
    for i, fam in enumerate(families):
        parent, _, leaf = fam.name.rpartition(".")
        block = model.get_submodule(parent) if parent else None
        if leaf == "conv1" and isinstance(block, PreActBlock):
            for part in ("conv1", "bn2", "conv2") + (("bn1",) if block.shortcut is None else ()):
                out[f"{parent}.{part}"] = i
    return out


def vanishing_families(model, families) -> set[int]:
    """The families that may take width 0 (their whole residual branch goes; surgery removes it)."""
    return set(vanishing_modules(model, families).values())


def _layer_cost(layer: Layer, k_in: int, k_out: int, kind: str) -> float:
    if layer.kind == "conv":
        weights = layer.kernel * k_in * k_out
        return float(weights * layer.positions + (k_out * layer.positions if layer.bias else 0)) if kind == "macs" \
            else float(weights + (k_out if layer.bias else 0))
    if layer.kind == "bn":
        return float(2 * k_in * (layer.positions if kind == "macs" else 1))
    return float(k_in * k_out + (k_out if layer.bias else 0))


def cost_problem(layers: list[Layer], options: list[list[int]], kind: str) -> Problem:
    """The MACs (as torch-pruning counts them: conv, BN x2, linear) or parameters of the network as factors over
    the families' widths; a layer whose branch vanishes costs nothing then."""
    if kind not in ("macs", "params"):
        raise ValueError(f"cost kind must be 'macs' or 'params', got {kind!r}")
    constant, factors = 0.0, []
    for layer in layers:
        scope = tuple(sorted({f for f in (layer.in_family, layer.out_family, layer.vanish_with) if f is not None}))
        if not scope:
            constant += _layer_cost(layer, layer.in_fixed, layer.out_fixed, kind)
            continue
        grid = np.zeros([len(options[f]) for f in scope])
        for idx in np.ndindex(*grid.shape):
            width = {f: options[f][i] for f, i in zip(scope, idx)}
            if layer.vanish_with is not None and width[layer.vanish_with] == 0:
                continue
            k_in = width[layer.in_family] if layer.in_family is not None else layer.in_fixed
            k_out = width[layer.out_family] if layer.out_family is not None else layer.out_fixed
            grid[idx] = _layer_cost(layer, k_in, k_out, kind)
        factors.append(Factor(scope, grid))
    return Problem(options, factors, constant, network_order(layers, len(options)))


def network_order(layers: list[Layer], n: int) -> tuple[int, ...]:
    """Families in the order the network first touches them: the solver then holds few families at a time."""
    first = {}
    for i, layer in enumerate(layers):
        for f in (layer.in_family, layer.out_family, layer.vanish_with):
            if f is not None:
                first.setdefault(f, i)
    return tuple(sorted(range(n), key=lambda f: first.get(f, len(layers))))
