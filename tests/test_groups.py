"""Coupled channel groups, the aligned group-l0 prox, and surgery on coupled-zero channels."""
import itertools
import math
import random

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

import models
from pipeline.algorithms.groups import coupled_families, group_costs, paper_families
from pipeline.algorithms.rgsm import RGSM, aligned_group_l0_keep, allowed_widths, group_hard_threshold
from pipeline.algorithms.surgery import remove_dead_channels
from pipeline.devices.hardware import nchwc_block
from tests.helpers import randomized_model


def example(n=2, seed=1):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def slice_set(family, j):
    return {(s.name, s.dim, int(s.index[j])) for s in family.slices}


def dg_slice_set(dg, model, root, j):
    """What torch-pruning's own pruning group for channel j of ``root`` touches, as (param, dim, index)."""
    names = {m: n for n, m in model.named_modules()}
    out = set()
    for item in dg.get_pruning_group(root, tp.prune_conv_out_channels, [j]):
        dep, (idx,) = item.dep, list(item.idxs)
        module, op = dep.target.module, dep.target.type
        reads = dg.is_in_channel_pruning_fn(dep.handler)
        if op == tp.ops.OPTYPE.CONV:
            out.add((f"{names[module]}.weight", 1 if reads else 0, idx))
        elif op == tp.ops.OPTYPE.BN:
            out |= {(f"{names[module]}.weight", 0, idx), (f"{names[module]}.bias", 0, idx)}
        elif op == tp.ops.OPTYPE.LINEAR:
            assert reads
            out.add((f"{names[module]}.weight", 1, idx))
    return out


@pytest.mark.parametrize("ensemble", [1, 2])
def test_coupled_groups_match_dependency_graph_pruning_groups(ensemble):
    model = models.create_model("preact_resnet20", ensemble=ensemble, noise_coef=0.1).train()
    families = coupled_families(model, example())
    assert all(m.training for m in model.modules())          # graph building switched to eval: restored
    assert len(families) == 12 * ensemble                     # 3 residual streams + 9 block-internal per member
    params = {id(p) for p in model.parameters()}
    assert all(id(s.tensor) in params for f in families for s in f.slices)   # live parameters, not copies

    with models.noise_disabled(model), torch.enable_grad():
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example(), verbose=False)
    modules = dict(model.named_modules())
    for f in families:
        root = modules[f.name]
        for j in range(f.width):
            assert slice_set(f, j) == dg_slice_set(dg, model, root, j), (f.name, j)


def test_resnet20_family_inventory():
    """Hand-counted: the stage-3 residual channel is produced by 3 conv2 + 1 shortcut, normalised by 3 BNs
    (bn1 of blocks 2-3, final bn), read by 2 conv1 and the classifier."""
    families = {f.name: f for f in coupled_families(models.create_model("preact_resnet20"), example())}
    stage3 = families["members.0.layer3.2.conv2"]
    assert stage3.width == 64
    assert sorted(s.name for s in stage3.slices if s.dim == 1) == [
        "members.0.layer3.1.conv1.weight", "members.0.layer3.2.conv1.weight", "members.0.linear.weight"]
    assert sorted(s.name for s in stage3.slices if s.dim == 0 and "conv" in s.name or "shortcut" in s.name) == [
        "members.0.layer3.0.conv2.weight", "members.0.layer3.0.shortcut.weight",
        "members.0.layer3.1.conv2.weight", "members.0.layer3.2.conv2.weight"]
    assert stage3.group_size == 3 * (64 * 9) + 32 + 2 * (64 * 9) + 10 + 3 * 2    # conv2s, shortcut, conv1s, linear, BNs
    internal = families["members.0.layer2.1.conv1"]
    assert sorted((s.name, s.dim) for s in internal.slices) == [
        ("members.0.layer2.1.bn2.bias", 0), ("members.0.layer2.1.bn2.weight", 0),
        ("members.0.layer2.1.conv1.weight", 0), ("members.0.layer2.1.conv2.weight", 1)]
    assert internal.group_size == 32 * 9 + 2 + 32 * 9


def zero_group(family, j):
    with torch.no_grad():
        for s in family.slices:
            s.tensor.select(s.dim, int(s.index[j])).zero_()


def widths(model):
    return {n: (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features)
            for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@pytest.mark.parametrize("arch,ensemble", [("test_resnet", 2), ("preact_resnet20", 1)])
def test_zeroing_one_coupled_group_removes_exactly_that_channel(arch, ensemble):
    rng = random.Random(0)
    base = randomized_model(arch, ensemble)
    n_families = len(coupled_families(base, example()))
    for fi in range(n_families):
        model = randomized_model(arch, ensemble)
        family = coupled_families(model, example())[fi]
        j = rng.randrange(family.width)
        zero_group(family, j)
        before = widths(model)
        res = remove_dead_channels(model, example(4, seed=fi))
        assert res.max_abs_diff <= 1e-5
        after = widths(res.model)
        readers = {s.name.rsplit(".", 1)[0] for s in family.slices if s.dim == 1}
        producers = {s.name.rsplit(".", 1)[0] for s in family.slices if s.dim == 0 and s.tensor.dim() > 1}
        for name, (cin, cout) in before.items():
            assert after[name] == (cin - (name in readers), cout - (name in producers)), (family.name, name)
        # in the paper's unit (conv input-channel groups): every zero group is a removed one
        conv_readers = len(readers - {n for n in readers if n.endswith("linear")})
        assert res.zero_channels == res.removed_channels == conv_readers and res.kept_for_shape == 0


def brute_force_cost(s, lam, beta, align, min_keep):
    n = len(s)
    allowed = set(allowed_widths(n, align, min_keep))
    best = math.inf
    for keep in itertools.product([False, True], repeat=n):
        if sum(keep) in allowed:
            best = min(best, lam * sum(keep) + 0.5 * beta * sum(v for v, k in zip(s, keep) if not k))
    return best


def test_aligned_prox_equals_brute_force_on_random_norms():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 11)
        align = rng.choice([1, 2, 3, 4, 8])
        min_keep = rng.choice([0, align])
        s = [rng.uniform(0, 2) ** 2 for _ in range(n)]
        lam, beta = rng.uniform(0.01, 1.5), rng.uniform(0.2, 3)
        keep = aligned_group_l0_keep(torch.tensor(s), lam, beta, align, min_keep)
        k = int(keep.sum())
        assert k % align == 0 or k == n
        assert k >= min(min_keep, n)
        cost = lam * k + 0.5 * beta * sum(v for v, kk in zip(s, keep.tolist()) if not kk)
        assert cost == pytest.approx(brute_force_cost(s, lam, beta, align, min_keep), rel=1e-12, abs=1e-12)


def test_aligned_prox_keeps_multiples_of_align_on_a_model():
    model = randomized_model("preact_resnet20", 1)
    families = coupled_families(model, example())
    scales = group_costs(model, families, example(), "macs")
    # lambda1 at the median cost-scaled squared norm: about half of all groups fall below their threshold
    lambda1 = 0.5 * float(torch.cat([f.sq_norms() / c for f, c in zip(families, scales)]).median())
    r = RGSM(families, beta=1.0, lambda1=lambda1, lambda2=0.0, align=16, min_keep=16, scales=scales)
    r.project()
    kept = r.kept_widths()
    assert all(k % 16 == 0 and 16 <= k for k in kept.values()), kept
    assert any(k < f.width for k, f in zip(kept.values(), families)), kept
    res = remove_dead_channels(model, example(4))
    assert res.removed_fraction == 1.0 and res.kept_for_shape == 0
    pruned = widths(res.model)
    for f in families:
        assert pruned[f.name][1] == kept[f.name]


def test_align_one_reduces_to_plain_group_l0_prox():
    torch.manual_seed(0)
    for _ in range(50):
        w = torch.randn(6, 9, 3, 3, dtype=torch.float64) * torch.rand(1, 9, 1, 1, dtype=torch.float64) * 2
        lam, beta = random.uniform(0.1, 3), random.uniform(0.5, 2)
        norms_sq = w.transpose(0, 1).reshape(9, -1).pow(2).sum(1)
        keep = aligned_group_l0_keep(norms_sq, lam, beta, align=1, min_keep=0)
        threshold = math.sqrt(2 * lam / beta)
        assert torch.equal(keep, norms_sq.sqrt() > threshold)
        r = RGSM([w.clone()], beta=beta, lambda1=lam, lambda2=0.0)
        r.project()
        torch.testing.assert_close(r.weights[0], group_hard_threshold(w, threshold), rtol=0, atol=0)


def test_paper_rgsm_is_unchanged_by_families():
    """paper_families over a model == the original per-weight RGSM (pull and project on every conv)."""
    model = randomized_model("test_resnet", 2)
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    copies = [w.detach().clone() for w in convs]
    r = RGSM(paper_families(model), beta=1.0, lambda1=1.0, lambda2=0.0)
    r.pull(0.1)
    t = r.threshold
    for w, c in zip(convs, copies):
        torch.testing.assert_close(w.detach(), c - 0.1 * (c - group_hard_threshold(c, t)))


def test_group_costs_weights_and_macs_hand_counted():
    model = models.create_model("preact_resnet20")
    families = {f.name: f for f in coupled_families(model, example())}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    n_ref = sum(m.weight.numel() for m in convs) / 675
    # conv MACs per image of ResNet20: stem 3->16 and 6 convs 16->16 at 32x32; 16->32 (3x3 and 1x1) and 5 convs
    # 32->32 at 16x16; 32->64 (3x3 and 1x1) and 5 convs 64->64 at 8x8
    conv_macs = (3 * 16 * 9 + 6 * 16 * 16 * 9) * 1024 + (16 * 32 * 10 + 5 * 32 * 32 * 9) * 256 \
        + (32 * 64 * 10 + 5 * 64 * 64 * 9) * 64
    macs_ref = conv_macs / 675
    names = list(families)
    by_weights = dict(zip(names, group_costs(model, list(families.values()), example(), "weights")))
    by_macs = dict(zip(names, group_costs(model, list(families.values()), example(), "macs")))
    assert n_ref == pytest.approx(400.379, abs=1e-3)
    assert by_weights["members.0.layer2.1.conv1"] == pytest.approx((32 * 9 + 2 + 32 * 9) / n_ref)
    # a block-internal channel of layer2.1: one conv1 filter and one conv2 input slice, both at 16x16
    assert by_macs["members.0.layer2.1.conv1"] == pytest.approx(2 * 32 * 9 * 256 / macs_ref)
    # the stage-3 residual channel: 3 conv2 filters + the 1x1 shortcut filter + 2 conv1 slices at 8x8, and
    # one classifier column (10 MACs); BN entries cost nothing (folded into the convs by onnxruntime)
    assert by_macs["members.0.layer3.2.conv2"] == pytest.approx(((3 * 64 * 9 + 32 + 2 * 64 * 9) * 64 + 10) / macs_ref)
    with pytest.raises(ValueError, match="cost"):
        group_costs(model, list(families.values()), example(), "flops")


def test_scales_set_each_family_threshold():
    model = models.create_model("preact_resnet20")
    families = coupled_families(model, example())
    scales = group_costs(model, families, example(), "weights")
    r = RGSM(families, beta=2.0, lambda1=0.5, lambda2=0.0, scales=scales)
    assert r.family_thresholds() == pytest.approx([math.sqrt(2 * 0.5 / 2.0) * math.sqrt(c) for c in scales])
    assert RGSM(families, beta=2.0, lambda1=0.5, lambda2=0.0).family_thresholds()[0] == pytest.approx(math.sqrt(0.5))
    with pytest.raises(ValueError, match="scale"):
        RGSM(families, beta=2.0, lambda1=0.5, lambda2=0.0, scales=[1.0])


def test_regularize_is_group_lasso_gradient_of_coupled_groups():
    model = randomized_model("test_resnet", 1).double()
    families = coupled_families(model, example().double())
    scales = group_costs(model, families, example().double(), "macs")
    r = RGSM(families, beta=1.0, lambda1=0.1, lambda2=0.01, scales=scales)
    params = r.weights
    for p in params:
        p.grad = None
    r.regularize()
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    with torch.enable_grad():
        penalty = sum(0.01 * math.sqrt(c) * sum(
            s.tensor.index_select(s.dim, s.index).transpose(0, s.dim).reshape(f.width, -1).pow(2).sum(1)
            for s in f.slices).sqrt().sum() for f, c in zip(families, scales))
        penalty.backward()
    for g, p in zip(got, params):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.parametrize("machine,flags,block", [
    ("x86_64", {"avx2", "avx512f"}, 16), ("x86_64", {"avx2", "fma"}, 8), ("x86_64", set(), 8),
    ("aarch64", set(), 1), ("arm64", set(), 1), ("riscv64", set(), 1)])
def test_nchwc_block(machine, flags, block):
    assert nchwc_block(machine, flags) == block
