"""Pruning to a budget (pipeline/algorithms/budget.py): the exact solver against brute force, its monotonicity in
the target, and the cost model against torch-pruning's own count of the physically pruned network."""
import itertools

import numpy as np
import pytest
import torch

from pipeline.algorithms.budget import (Factor, Problem, cost_problem, group_loss, network_layers, solve,
                                        vanishing_families)
from pipeline.algorithms.groups import coupled_families
from pipeline.algorithms.surgery import count_params_macs


def brute_force(problem: Problem, losses, limit):
    best = None
    for choice in itertools.product(*(range(len(o)) for o in problem.options)):
        if problem.cost(list(choice)) <= limit:
            loss = sum(losses[f][i] for f, i in enumerate(choice))
            if best is None or loss < best[0]:
                best = (loss, list(choice))
    return best


def random_problem(rng: np.random.Generator) -> tuple[Problem, list[np.ndarray]]:
    n = int(rng.integers(2, 6))
    options = [sorted(set(rng.choice([0, 1, 2, 3, 4, 6, 8], size=int(rng.integers(1, 5)), replace=False).tolist()))
               for _ in range(n)]
    factors = []
    for _ in range(int(rng.integers(1, 6))):
        scope = tuple(sorted(rng.choice(n, size=int(rng.integers(1, min(3, n) + 1)), replace=False).tolist()))
        widths = np.meshgrid(*[np.array(options[f], float) for f in scope], indexing="ij")
        # costs that grow with every width involved (a product, as for a conv), plus noise
        table = rng.uniform(0.5, 2.0) * np.prod(widths, axis=0) + rng.uniform(0, 1, size=widths[0].shape)
        factors.append(Factor(scope, table))
    losses = []
    for o in options:     # a wider family loses less
        drops = np.sort(rng.uniform(0, 5, size=len(o)))[::-1]
        losses.append(np.cumsum(drops[::-1])[::-1] - drops[-1])
    return Problem(options, factors, float(rng.uniform(0, 3))), losses


@pytest.mark.parametrize("seed", range(60))
def test_solver_finds_the_cheapest_loss_layout_within_the_budget(seed):
    rng = np.random.default_rng(seed)
    problem, losses = random_problem(rng)
    costs = [problem.cost(list(c)) for c in itertools.product(*(range(len(o)) for o in problem.options))]
    limit = float(rng.uniform(min(costs) * 0.9, max(costs) * 1.05))
    expected = brute_force(problem, losses, limit)
    choice = solve(problem, losses, limit)
    if expected is None:
        assert choice is None
        return
    assert choice is not None and problem.cost(choice) <= limit + 1e-9
    assert sum(losses[f][i] for f, i in enumerate(choice)) == pytest.approx(expected[0], abs=1e-9)


def test_group_loss_is_the_energy_of_the_dropped_groups():
    sq = np.array([4.0, 1.0, 9.0, 0.25])
    assert group_loss(sq, [0, 1, 2, 4], beta=2.0).tolist() == [14.25, 5.25, 1.25, 0.0]


@pytest.fixture(scope="module")
def resnet():
    from tests.helpers import randomized_model

    model = randomized_model("test_resnet", 2)
    example = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    families = coupled_families(model, example)
    return model, example, families


def _options(model, families, align=2):
    vanish = vanishing_families(model, families)
    return [sorted({*range(align, f.width + 1, align), f.width} | ({0} if i in vanish else set()))
            for i, f in enumerate(families)]


def test_solution_shrinks_as_the_target_grows(resnet):
    model, example, families = resnet
    options = _options(model, families)
    problem = cost_problem(network_layers(model, families, example), options, "macs")
    losses = [group_loss(f.sq_norms().numpy(), o, beta=1.0) for f, o in zip(families, options)]
    dense = problem.cost(problem.dense_choice())
    previous_loss, previous_cost = -1.0, float("inf")
    for target in (1.0, 1.25, 1.5, 2.0, 3.0):
        choice = solve(problem, losses, dense / target)
        cost = problem.cost(choice)
        loss = sum(losses[f][i] for f, i in enumerate(choice))
        assert cost <= dense / target + 1e-6
        assert loss >= previous_loss - 1e-12 and cost <= previous_cost + 1e-6
        previous_loss, previous_cost = loss, cost
    assert previous_loss > 0


def test_cost_model_counts_what_torch_pruning_counts(resnet):
    import copy

    import torch_pruning as tp

    from models import noise_disabled

    model, example, families = resnet
    options = [[f.width] for f in families]
    layers = network_layers(model, families, example)
    params, macs = count_params_macs(model)
    assert cost_problem(layers, options, "macs").cost([0] * len(families)) == macs
    assert cost_problem(layers, options, "params").cost([0] * len(families)) == params
    # every family narrowed by one channel, physically, with torch-pruning: the factors' bilinear terms
    pruned = copy.deepcopy(model)
    pruned_families = coupled_families(pruned, example)
    with noise_disabled(pruned), torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(pruned, example_inputs=example)
        roots = {n: m for n, m in pruned.named_modules()}
        for fam in pruned_families:
            dg.get_pruning_group(roots[fam.name], tp.prune_conv_out_channels, [0]).prune()
    narrow = [[f.width - 1] for f in families]
    params, macs = count_params_macs(pruned)
    assert cost_problem(layers, narrow, "macs").cost([0] * len(families)) == macs
    assert cost_problem(layers, narrow, "params").cost([0] * len(families)) == params


def test_a_zeroed_block_internal_family_removes_the_branch_exactly(resnet):
    """Depth pruning: width 0 for a block-internal family -> surgery removes conv1, bn2, conv2 (and bn1 of an
    identity block); the function is unchanged (noise off) and the description rebuilds the smaller network."""
    import copy

    from models import build_from_description, describe, noise_disabled
    from pipeline.algorithms.surgery import remove_dead_channels

    model, example, _ = resnet
    masked = copy.deepcopy(model)
    families = coupled_families(masked, example)
    vanish = sorted(vanishing_families(masked, families))
    assert len(vanish) == 6     # one internal family per block: 3 blocks x 2 members
    # member 0's stage-1 block (identity shortcut) and stage-2 block (projection)
    chosen = [i for i in vanish if families[i].name in ("members.0.layer1.0.conv1", "members.0.layer2.0.conv1")]
    with torch.no_grad():
        for i in chosen:
            for s in families[i].slices:
                s.tensor.index_fill_(s.dim, s.index, 0.0)
    result = remove_dead_channels(masked, example)
    assert result.removed_branches == ["members.0.layer1.0", "members.0.layer2.0"]
    identity, projection = result.model.members[0].layer1[0], result.model.members[0].layer2[0]
    assert (identity.conv1, identity.bn2, identity.conv2, identity.bn1) == (None, None, None, None)
    assert projection.conv1 is None and projection.bn1 is not None and projection.shortcut is not None
    assert result.max_abs_diff <= 1e-5
    rebuilt = build_from_description(describe(result.model, "test_resnet", {"ensemble": 2, "noise_coef": 0.1}))
    rebuilt.load_state_dict(result.model.state_dict())
    with noise_disabled(rebuilt), noise_disabled(result.model), torch.no_grad():
        assert torch.equal(rebuilt.eval()(example), result.model.eval()(example))
    # and the cost model counts the removed branch as nothing
    options = [[0] if i in chosen else [f.width] for i, f in enumerate(families)]
    layers = network_layers(model, coupled_families(model, example), example)
    params, macs = count_params_macs(result.model)
    assert cost_problem(layers, options, "macs").cost([0] * len(options)) == macs
    assert cost_problem(layers, options, "params").cost([0] * len(options)) == params


def test_latency_table_structure_units_modules_and_problem(resnet):
    """The latency model's pieces (the measured accuracy is benchmarks/latency_table.py's business): every unit
    signature builds a module that runs, and with a table giving each unit its MACs the problem is the MAC
    problem up to the stem's normalisation and the residual adds (which MACs do not count)."""
    from pipeline.algorithms.latency import latency_problem, network_units, signatures, unit_module
    from pipeline.train.sparsify import allowed_widths

    model, example, families = resnet
    units = network_units(model, families)
    assert [u.kind for u in units] == ["stem", "block", "block", "block", "head"] * 2
    options = allowed_widths(model, families, 2)
    sigs = signatures(units, options)
    assert len(sigs) == len(set(sigs)) and any(":0-" in s or "-0-" in s for s in sigs)   # branch-less blocks too
    table = {}
    for sig in sigs:
        module, shape = unit_module(sig)
        module.eval()
        with torch.no_grad():
            module(torch.rand(shape))
        table[sig] = 0.0 if sig.startswith("noop:") else float(count_params_macs(module, shape)[1])
    problem = latency_problem(units, options, table, offset=0.0)
    macs = cost_problem(network_layers(model, families, example), options, "macs")
    for choice in (problem.dense_choice(), [0] * len(options), [len(o) // 2 for o in options]):
        assert problem.cost(choice) == pytest.approx(macs.cost(choice), rel=1e-9)


def test_budget_every_resolves_the_layout_every_n_pulls_and_at_each_projection():
    """budget_every = 3: the (costly) layout solve runs at the first pull, every third pull after it and at every
    projection; in between each family keeps its k largest groups of the current weights."""
    import torch

    from pipeline.algorithms.budget import Factor, Problem
    from pipeline.algorithms.groups import input_channel_family
    from pipeline.algorithms.rgsm import RGSM, Budget

    weights = [torch.randn(4, 6, 3, 3), torch.randn(4, 8, 3, 3)]
    families = [input_channel_family(f"w{i}", w) for i, w in enumerate(weights)]
    options = [[2, 4, 6], [4, 8]]
    problem = Problem(options, [Factor((0,), np.array([2.0, 4.0, 6.0])), Factor((1,), np.array([4.0, 8.0]))])
    budget = Budget(problem, limit=8.0, reference=14.0)
    calls = []
    real = Budget.widths

    class Counting(Budget):
        def widths(self, sq, beta):
            calls.append(1)
            return real(self, sq, beta)

    rgsm = RGSM(families, beta=1.0, lambda1=0.0, lambda2=0.0,
                budget=Counting(budget.problem, budget.limit, budget.reference), budget_every=3)
    for _ in range(7):
        rgsm.pull(0.1)
    assert len(calls) == 3            # pulls 1, 4 and 7
    rgsm.project()
    assert len(calls) == 4            # the projection solves afresh
    kept = rgsm.kept_widths()
    assert rgsm.budget.cost_of(list(kept.values())) <= 8.0
    with pytest.raises(ValueError, match="budget_every"):
        RGSM(families, beta=1.0, lambda1=0.0, lambda2=0.0, budget=budget, budget_every=0)


@pytest.mark.parametrize("seed", range(40))
def test_bucketed_solver_meets_the_limit_and_its_guarantee(seed):
    """The fallback for exploding frontiers: its layout meets the limit, and no layout costing ``n·delta`` less
    than the limit has a lower loss (brute force)."""
    rng = np.random.default_rng(seed)
    problem, losses = random_problem(rng)
    layouts = list(itertools.product(*(range(len(o)) for o in problem.options)))
    costs = [problem.cost(list(c)) for c in layouts]
    limit = float(rng.uniform(min(costs) * 0.9, max(costs) * 1.05))
    buckets = int(rng.choice([8, 64, 1024]))
    from pipeline.algorithms.budget import _solve_buckets

    choice = _solve_buckets(problem, losses, limit, buckets)
    cheapest = problem.constant + sum(float(f.table.min()) for f in problem.factors)
    if cheapest > limit:
        assert choice is None
        return
    assert choice is not None and problem.cost(choice) <= limit * (1 + 1e-9)
    delta = (limit - cheapest) / buckets
    loss = sum(losses[f][i] for f, i in enumerate(choice))
    safe = [sum(losses[f][i] for f, i in enumerate(c)) for c, cost in zip(layouts, costs)
            if cost <= limit - len(problem.options) * delta]
    assert all(loss <= s + 1e-9 for s in safe)
    # solve() itself is exact when the frontier fits, and falls back when told the frontier may hold 1 point
    forced = solve(problem, losses, limit, max_points=1, buckets=buckets)
    assert forced is not None and problem.cost(forced) <= limit * (1 + 1e-9)
