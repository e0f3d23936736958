"""Pruning to a budget: the widths of every channel family that remove the least weight energy while the pruned
network's cost (MACs, parameters or a device's latency) stays within a limit.

The problem, for families f with allowed widths K_f (multiples of the hardware block, the dense width, and 0 for a
block-internal family whose whole residual branch may go):

    minimise  Σ_f loss_f(k_f)      subject to    Σ_j cost_j(k_{S_j}) <= limit,

where loss_f(k) = (beta/2)·(sum of the n_f - k smallest squared group norms of f) -- what RGSM's hard prox pays
for dropping groups, so for a fixed width the kept groups are the k largest -- and the cost is a sum of *factors*,
each a table over the widths of a few families S_j: a conv's MACs are k_in·k_out·(kernel·positions), a depthwise
conv's k·(kernel·positions) (its input and output are one family), a block's measured latency depends on its input,
internal and output widths.

The solver is exact: dynamic programming over the families in network order, keeping for every assignment of the
families that still share a factor with a family to come (two residual streams at most in a ResNet) the Pareto set
of (cost so far, loss so far), pruned by a lower bound on the cost still to come (a MobileNetV2 holds two families
at a time: a stage's stream and one block's expansion). A Lagrangian bisection on a single lambda would be cheaper,
but a knapsack over discrete widths has a duality gap: it can miss the best layout, or land well inside the budget.
Here the answer is the cheapest-loss layout that meets the budget (tests/test_budget.py checks it against brute
force), and it moves smoothly with the target -- no lambda cliff.
When a Pareto set outgrows ``max_points`` (MobileNetV2, ResNet-18, ResNet20 En_5 at fine grids) the same DP runs on
a cost grid instead (``_solve_buckets``): still within the limit, within a stated slack of the optimum.
"""
from __future__ import annotations

import math
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


MAX_OPTIONS = 16   # widths per family the budget should offer (grid_step): the solve's work grows with their product


def grid_step(width: int, step: int, max_options: int = MAX_OPTIONS) -> int:
    """The smallest multiple of ``step`` (the hardware block / budget grid) that offers at most ``max_options``
    widths ``step_f, 2·step_f, ...`` below ``width``: ``step`` itself for every family of the pre-activation ResNets
    (64 channels at most, step 8), coarser for MobileNetV2's 960-channel expansions or ResNet-18's 512 channels."""
    return step * max(1, math.ceil(width / (step * max_options)))


def group_loss(sq_norms: np.ndarray, widths: list[int], beta: float) -> np.ndarray:
    """loss(k) for each allowed width k: (beta/2)·(sum of the n - k smallest squared norms)."""
    s = np.sort(np.asarray(sq_norms, dtype=np.float64))            # ascending
    dropped = np.concatenate([[0.0], np.cumsum(s)])                 # dropped[m] = sum of the m smallest
    n = len(s)
    return 0.5 * beta * np.array([dropped[n - k] for k in widths])


def _pareto(cost: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats in both (cost lower or equal, loss lower), cheapest first.

    The points come as concatenated Pareto sets (each sorted by cost), so a stable sort by cost is a merge of sorted
    runs (timsort); of points of equal cost, the last one kept has the least loss and the others go."""
    order = np.argsort(cost, kind="stable")
    best = np.minimum.accumulate(loss[order])
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = loss[order][1:] < best[:-1]
    kept = order[keep]
    c = cost[kept]
    return kept[np.append(c[1:] != c[:-1], True)]


class _FrontierOverflow(Exception):
    """A Pareto set outgrew ``max_points``: the exact DP is not tractable on this problem."""


def solve(problem: Problem, losses: list[np.ndarray], limit: float, *, max_points: int = 6144,
          buckets: int = 8192) -> list[int] | None:
    """The option index per family of the least-loss layout with cost <= ``limit``; None if none fits.

    Exact (Pareto sets of (cost, loss) per state) while every Pareto set stays within ``max_points`` -- the
    pre-activation ResNets on an 8-channel grid, En_5 ResNet20 included (~4,200 points). When one outgrows it
    (MobileNetV2: 25 families of up to 160 widths, sets of tens of thousands of points), the cost-bucketed DP
    (``_solve_buckets``) answers instead: the cost the widths can change split into ``buckets`` steps, each family's
    cost rounded up, so its layout meets ``limit`` and its loss is at most that of any layout costing ``n_families``
    buckets less than ``limit``. MobileNetV2, MAC target 2, 8-channel grid, random norms: the exact DP takes ~130 s
    (loss 10.246), this ~0.5 s (loss 10.292, 0.13 % of the budget unused). Keep the families' options few
    (``grid_step``): the work grows with the product of the options of the families held at a time."""
    n = len(problem.options)
    if problem.order and list(problem.order) != list(range(n)):
        # relabel the families in solving order, solve, map back
        order = list(problem.order)
        rank = {f: i for i, f in enumerate(order)}
        relabelled = Problem([problem.options[f] for f in order], [
            Factor(tuple(sorted(rank[f] for f in fac.scope)),
                   np.transpose(fac.table, np.argsort([rank[f] for f in fac.scope])) if fac.scope else fac.table)
            for fac in problem.factors], problem.constant)
        choice = solve(relabelled, [losses[f] for f in order], limit, max_points=max_points, buckets=buckets)
        return None if choice is None else [choice[rank[f]] for f in range(n)]
    try:
        return _solve_pareto(problem, losses, limit, max_points)
    except _FrontierOverflow:
        return _solve_buckets(problem, losses, limit, buckets)


def _schedule(problem: Problem):
    """Per family (in solving order): the last family it shares a factor with, and the factors whose last family
    it is (they are priced when it is assigned)."""
    n = len(problem.options)
    last = [max((max(fac.scope) for fac in problem.factors if f in fac.scope), default=f) for f in range(n)]
    done_at = [[fac for fac in problem.factors if max(fac.scope, default=-1) == f] for f in range(n)]
    return last, done_at


def _adds(factors: list[Factor], assigned: dict[int, int], f: int, n_options: int) -> np.ndarray:
    """The cost of ``factors`` (all ending at family ``f``) for each option of ``f``, the others as ``assigned``."""
    total = np.zeros(n_options)
    for fac in factors:
        total = total + fac.table[tuple(slice(None) if s == f else assigned[s] for s in fac.scope)]
    return total


def _solve_pareto(problem: Problem, losses: list[np.ndarray], limit: float, max_points: int) -> list[int] | None:
    """The exact DP: per assignment of the active families, the Pareto set of (cost so far, loss so far), pruned by a
    lower bound on the cost still to come. Raises ``_FrontierOverflow`` when a set outgrows ``max_points``."""
    n = len(problem.options)
    last, done_at = _schedule(problem)
    # a lower bound on the cost still to come after each step: every later factor at its cheapest
    min_after = np.zeros(n + 1)
    for f in range(n - 1, -1, -1):
        min_after[f] = min_after[f + 1] + sum(float(fac.table.min()) for fac in done_at[f])
    constant_free = [fac for fac in problem.factors if not fac.scope]
    start = problem.constant + sum(float(fac.table) for fac in constant_free)
    # states: active families (option indices, in family order) -> (cost, loss, back); back = (previous keys,
    # options, part of each point, its index in its previous state's arrays)
    states = {(): (np.array([start]), np.array([0.0]), None)}
    active: tuple[int, ...] = ()
    history = []
    for f in range(n):
        after = tuple(g for g in (*active, f) if last[g] > f)
        n_options = len(problem.options[f])
        grouped: dict[tuple, list] = {}
        for key, (cost, loss, _) in states.items():
            assigned = dict(zip(active, key))
            adds = _adds(done_at[f], assigned, f, n_options)
            for i in range(n_options):
                assigned[f] = i
                c = cost + adds[i]
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
            keep = _pareto(c, l_)
            if len(keep) > max_points:
                raise _FrontierOverflow
            part = np.repeat(np.arange(len(parts)), [len(p[0]) for p in parts])
            index = np.concatenate([p[3] for p in parts])
            new_states[new_key] = (c[keep], l_[keep],
                                   ([p[2] for p in parts], [p[4] for p in parts], part[keep], index[keep]))
        history.append(new_states)
        states, active = new_states, after
        if not states:
            return None
    (cost, loss, back), = states.values()
    choice = [0] * n
    key, j = (), int(np.argmin(loss))
    for f in range(n - 1, -1, -1):
        keys, options, part, index = history[f][key][2]
        p = int(part[j])
        choice[f] = options[p]
        key, j = keys[p], int(index[j])
    return choice


def _solve_buckets(problem: Problem, losses: list[np.ndarray], limit: float, buckets: int) -> list[int] | None:
    """The DP on a cost grid: every factor's cost above its cheapest entry (its *excess*) summed per step and rounded
    up to a multiple of ``delta = (limit - cheapest layout's cost) / buckets``; per assignment of the active
    families, the least loss at each rounded excess 0..buckets. Rounding up makes every layout it can return meet
    ``limit``; a layout whose exact excess is at most ``(buckets - n_families)·delta`` is among those it compares,
    so it loses no more than the best layout costing ``n_families·delta`` less than the limit. Work per family:
    (active states) x (options) x ``buckets``."""
    n = len(problem.options)
    last, done_at = _schedule(problem)
    cheapest = problem.constant + sum(float(fac.table.min()) for fac in problem.factors)
    room = limit * (1 + 1e-12) - cheapest
    if room < 0:
        return None
    top = buckets if room > 0 else 0
    delta = room / buckets if room > 0 else 1.0
    inf = np.inf
    start = np.full(top + 1, inf)
    start[0] = 0.0
    states = {(): start}
    active: tuple[int, ...] = ()
    history = []
    for f in range(n):
        after = tuple(g for g in (*active, f) if last[g] > f)
        n_options = len(problem.options[f])
        floor = sum(float(fac.table.min()) for fac in done_at[f])
        grouped: dict[tuple, list] = {}
        for key, best in states.items():
            assigned = dict(zip(active, key))
            excess = np.maximum(_adds(done_at[f], assigned, f, n_options) - floor, 0.0)
            steps = np.ceil(excess / delta).astype(np.int64)
            for i in range(n_options):
                if steps[i] > top:
                    continue
                assigned[f] = i
                grouped.setdefault(tuple(assigned[g] for g in after), []).append(
                    (key, i, int(steps[i]), best, float(losses[f][i])))
        new_states = {}
        for new_key, parts in grouped.items():
            value = np.full(top + 1, inf)
            source = np.zeros(top + 1, dtype=np.int64)
            for p, (_, _, a, best, loss) in enumerate(parts):
                cand = best[:top + 1 - a] + loss
                target = value[a:]
                better = cand < target
                if better.any():
                    target[better] = cand[better]
                    source[a:][better] = p
            if np.isfinite(value).any():
                new_states[new_key] = value
            grouped[new_key] = ([(p[0], p[1], p[2]) for p in parts], source)
        history.append({k: grouped[k] for k in new_states})
        states, active = new_states, after
        if not states:
            return None
    (best,) = states.values()
    b = int(np.argmin(best))   # the least loss; ties: the cheapest
    if not np.isfinite(best[b]):
        return None
    choice = [0] * n
    key = ()
    for f in range(n - 1, -1, -1):
        parts, source = history[f][key]
        prev_key, i, a = parts[int(source[b])]
        choice[f] = i
        key, b = prev_key, b - a
    return choice


# ---------------------------------------------------------------------------------------------- cost of a network
@dataclass(frozen=True)
class Layer:
    """A conv, BN or linear layer as the cost model sees it: which family sets its input and output width (None:
    fixed at ``in_fixed``/``out_fixed``), how many output positions it has, and the family whose vanishing (width
    0: the residual branch removed) takes it away even though its own widths are not that family's."""
    name: str
    kind: str                   # "conv" | "depthwise" | "bn" | "linear"
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

    from .groups import is_depthwise, output_positions

    owner = {}
    for i, fam in enumerate(families):
        for s in fam.slices:
            owner[(id(s.tensor), s.dim)] = i
    positions = output_positions(model, example)
    vanish = vanishing_modules(model, families)
    layers = []
    for name, m in model.named_modules():
        if is_depthwise(m):
            # one filter per channel: input and output width are both its family's (or fixed at the channel count)
            fam = owner.get((id(m.weight), 0))
            layers.append(Layer(name, "depthwise", fam, fam, m.in_channels, m.out_channels,
                                m.kernel_size[0] * m.kernel_size[1], positions[name], m.bias is not None,
                                vanish.get(name)))
        elif isinstance(m, nn.Conv2d):
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
    if layer.kind in ("conv", "depthwise"):
        # a depthwise conv has one kernel per channel (k_in == k_out == its family's width): kernel·k weights
        weights = layer.kernel * k_out if layer.kind == "depthwise" else layer.kernel * k_in * k_out
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
