import math

import pytest
import torch
import torch.nn as nn

import models
from pipeline.algorithms.rgsm import RGSM, group_hard_threshold, group_lasso_grad
from pipeline.algorithms.sparsity import PAPER_ZERO_TOL, channel_sparsity, weight_sparsity

# A conv weight [C_out=2, C_in=3, 1, 1]; its groups are the input-channel columns W[:, i].
#   group 0: [0.3, 0.4]   ||.|| = 0.5
#   group 1: [0.06, 0.08] ||.|| = 0.1
#   group 2: [0, 0]       ||.|| = 0
G0, G1, G2 = [0.3, 0.4], [0.06, 0.08], [0.0, 0.0]


def weight(dtype=torch.float64):
    return torch.tensor([[G0[0], G1[0], G2[0]], [G0[1], G1[1], G2[1]]], dtype=dtype).view(2, 3, 1, 1)


def col(w, i):
    return w[:, i, 0, 0]


def rgsm(w, lambda1=0.02, beta=1.0, lambda2=0.0):
    return RGSM([w], beta=beta, lambda1=lambda1, lambda2=lambda2)


# --------------------------------------------------------------------------- thresholding

def test_threshold_formula():
    assert rgsm(weight()).threshold == 0.2                       # sqrt(2 * 0.02 / 1) = sqrt(0.04)
    assert rgsm(weight(), lambda1=0.5, beta=4.0).threshold == 0.5  # sqrt(1 / 4)
    assert rgsm(weight(), lambda1=1.2, beta=1.0).threshold == pytest.approx(math.sqrt(2.4))
    assert rgsm(weight(), lambda1=0.05, beta=2.0).threshold == pytest.approx(math.sqrt(0.05))
    assert rgsm(weight(), lambda1=0.0).threshold == 0.0
    with pytest.raises(ValueError):
        rgsm(weight(), beta=0.0)


def test_group_hard_threshold_hand_values():
    w = weight()
    u = group_hard_threshold(w, 0.2)
    assert u.shape == w.shape
    assert col(u, 0).tolist() == G0    # norm 0.5 > 0.2: kept unchanged
    assert col(u, 1).tolist() == [0, 0]  # norm 0.1 <= 0.2: zeroed
    assert col(u, 2).tolist() == [0, 0]
    assert col(w, 1).tolist() == G1    # input untouched
    # a threshold between the norms keeps both nonzero groups; above 0.5 nothing survives
    assert torch.equal(group_hard_threshold(w, 0.09), w)
    assert not group_hard_threshold(w, 0.51).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_exactly_at_threshold_is_zeroed(dtype):
    # dyadic values: ||[0.5, 0]|| == 0.5 exactly in float32 and float64; threshold sqrt(2*0.125/1) == 0.5
    w = torch.tensor([[0.5, 0.75], [0.0, 0.0]], dtype=dtype).view(2, 2, 1, 1)
    r = rgsm(w, lambda1=0.125, beta=1.0)
    assert r.threshold == 0.5
    u = group_hard_threshold(w, r.threshold)
    assert col(u, 0).tolist() == [0.0, 0.0]       # == threshold -> zero (<=)
    assert col(u, 1).tolist() == [0.75, 0.0]      # 0.75 > 0.5 -> kept


def test_group_hard_threshold_3x3_groups_are_input_channels():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 4, 3, 3, generator=g)
    w[:, 1] *= 0.01
    w[:, 3] *= 0.02
    norms = [float(w[:, i].norm()) for i in range(4)]
    thr = (norms[3] + min(norms[0], norms[2])) / 2   # between the small and the large groups
    u = group_hard_threshold(w, thr)
    for i in range(4):
        if norms[i] <= thr:
            assert not u[:, i].any()
        else:
            assert torch.equal(u[:, i], w[:, i])
    assert sorted(i for i in range(4) if u[:, i].any()) == [0, 2]


# --------------------------------------------------------------------------- pull / project

def test_pull_hand_values():
    w = weight()
    r = rgsm(w)                  # threshold 0.2
    r.pull(lr=0.1)               # w <- w - 0.1 * 1 * (w - u)
    assert col(w, 0).tolist() == G0                                    # u = w: unchanged
    torch.testing.assert_close(col(w, 1), torch.tensor([0.9 * 0.06, 0.9 * 0.08], dtype=w.dtype))
    assert col(w, 2).tolist() == [0, 0]
    assert r.projections == 0


def test_pull_scales_with_beta():
    w = weight()
    r = RGSM([w], beta=2.0, lambda1=0.04, lambda2=0.0)   # threshold sqrt(2*0.04/2) = 0.2 again
    assert r.threshold == pytest.approx(0.2)
    r.pull(lr=0.1)               # w - 0.1 * 2 * (w - u): group 1 -> 0.8 * w
    torch.testing.assert_close(col(w, 1), torch.tensor([0.8 * 0.06, 0.8 * 0.08], dtype=w.dtype))
    assert col(w, 0).tolist() == G0


def test_project_sets_w_to_u():
    w = weight()
    r = rgsm(w)
    expected = group_hard_threshold(w, 0.2)
    r.project()
    assert torch.equal(w, expected)
    assert col(w, 0).tolist() == G0 and not col(w, 1).any()
    assert r.projections == 1
    r.project()
    assert r.projections == 2


def test_updates_are_in_place_on_parameters():
    conv = nn.Conv2d(3, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(weight(torch.float32))
    r = RGSM([conv.weight], beta=1.0, lambda1=0.02, lambda2=0.0)
    r.project()
    assert not conv.weight[:, 1].any() and conv.weight[:, 0].any()
    assert conv.weight.requires_grad and conv.weight.grad is None


# --------------------------------------------------------------------------- group lasso

def test_regularize_hand_values():
    w = weight()
    lam2 = 1e-3
    w.grad = torch.full_like(w, 0.5)
    rgsm(w, lambda2=lam2).regularize()
    # group 0: w_g / ||w_g|| = [0.3, 0.4] / 0.5 = [0.6, 0.8]; group 1: [0.06, 0.08] / 0.1 = [0.6, 0.8]; group 2: 0
    torch.testing.assert_close(col(w.grad, 0), torch.tensor([0.5 + lam2 * 0.6, 0.5 + lam2 * 0.8], dtype=w.dtype))
    torch.testing.assert_close(col(w.grad, 1), torch.tensor([0.5 + lam2 * 0.6, 0.5 + lam2 * 0.8], dtype=w.dtype))
    assert col(w.grad, 2).tolist() == [0.5, 0.5]


def test_regularize_creates_missing_grad():
    w = weight()
    assert w.grad is None
    rgsm(w, lambda2=2e-3).regularize()
    assert w.grad is not None
    torch.testing.assert_close(col(w.grad, 0), torch.tensor([2e-3 * 0.6, 2e-3 * 0.8], dtype=w.dtype))
    assert not col(w.grad, 2).any()
    assert torch.isfinite(w.grad).all()


def test_group_lasso_grad_zero_group_is_zero_and_finite():
    g = group_lasso_grad(weight())
    torch.testing.assert_close(col(g, 0), torch.tensor([0.6, 0.8], dtype=torch.float64))
    assert col(g, 2).tolist() == [0, 0]
    assert torch.isfinite(g).all()


def test_state_dict_round_trip():
    a = RGSM([weight()], beta=2.0, lambda1=0.3, lambda2=1e-4, align=4, min_keep=4, scales=[2.5])
    a.project()
    a.project()
    state = a.state_dict()
    assert state == {"prox": "hard", "beta": 2.0, "lambda1": 0.3, "lambda2": 1e-4, "align": 4, "min_keep": 4,
                     "scales": [2.5], "projections": 2}
    b = RGSM([weight()], beta=1.0, lambda1=0.01, lambda2=0.0)
    b.load_state_dict(state)
    assert (b.beta, b.lambda1, b.lambda2, b.align, b.min_keep, b.scales, b.projections) == \
        (2.0, 0.3, 1e-4, 4, 4, [2.5], 2)
    assert b.threshold == a.threshold == pytest.approx(math.sqrt(0.3))
    import json
    assert json.loads(json.dumps(state)) == state   # goes into the manifest as plain JSON


# --------------------------------------------------------------------------- sparsity counts

# test_resnet member (widths 4/8/16, one block per stage): (conv name, C_in)
TEST_RESNET_CONVS = [
    ("conv1", 3),                                                                  # stem (RGB)
    ("layer1.0.conv1", 4), ("layer1.0.conv2", 4),                                  # 4 -> 4, no shortcut
    ("layer2.0.conv1", 4), ("layer2.0.conv2", 8), ("layer2.0.shortcut", 4),        # 4 -> 8
    ("layer3.0.conv1", 8), ("layer3.0.conv2", 16), ("layer3.0.shortcut", 8),       # 8 -> 16
]


def test_test_resnet_conv_inventory():
    member = models.create_model("test_resnet", ensemble=1).members[0]
    convs = [(n, m.in_channels) for n, m in member.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs == TEST_RESNET_CONVS


def test_channel_sparsity_counts_hand_zeroed_groups():
    torch.manual_seed(0)
    model = models.create_model("test_resnet", ensemble=2, noise_coef=0.1)
    per_member = 3 + (4 + 4) + (4 + 8 + 4) + (8 + 16 + 8)     # = 59: sum of C_in over the 9 convs
    assert per_member == sum(c for _, c in TEST_RESNET_CONVS) == 59
    total = 2 * per_member
    assert channel_sparsity(model) == (0, total)              # random init: nothing zero

    m0, m1 = model.members
    with torch.no_grad():
        m0.conv1.weight[:, 1] = 0                   # stem group: 1
        m0.layer2[0].shortcut.weight[:, 0] = 0      # shortcut groups: 2
        m0.layer2[0].shortcut.weight[:, 2] = 0
        m1.layer3[0].conv2.weight.zero_()           # an all-zero conv: 16 groups
        m1.layer3[0].shortcut.weight[:, 5] = 0      # 1
        m1.layer1[0].conv1.weight[:, 3] = 0         # 1
        # the paper's tolerance 1e-15: a group of norm 1e-16 is zero, 1e-14 is not
        m0.layer1[0].conv2.weight[:, 0] = 0
        m0.layer1[0].conv2.weight[0, 0, 0, 0] = 1e-16       # counts: 1
        m0.layer3[0].conv1.weight[:, 7] = 0
        m0.layer3[0].conv1.weight[0, 7, 1, 1] = 1e-14       # does not count
        # BN and linear weights never count
        m1.bn.weight.zero_()
        m1.linear.weight[:, 0] = 0
    zero = 1 + 2 + 16 + 1 + 1 + 1
    assert PAPER_ZERO_TOL == 1e-15
    assert channel_sparsity(model) == (zero, total)
    assert channel_sparsity(model, tol=1e-13) == (zero + 1, total)
    assert channel_sparsity(model, tol=1e-17) == (zero - 1, total)


def test_channel_sparsity_total_675_per_resnet20_member():
    model = models.create_model("preact_resnet20", ensemble=2)
    # stem 3; stage 1: 3 blocks x (16 + 16); stage 2: (16 + 32 + 16 shortcut) + 2 x (32 + 32);
    # stage 3: (32 + 64 + 32 shortcut) + 2 x (64 + 64)
    per_member = 3 + 3 * 32 + (64 + 2 * 64) + (128 + 2 * 128)
    assert per_member == 675
    assert channel_sparsity(model) == (0, 675 * 2)


def test_weight_sparsity_counts_conv_weights_only():
    torch.manual_seed(0)
    model = models.create_model("test_resnet", ensemble=2)
    # per member: conv weights 3*4*9 + 2*(4*4*9) + (4*8*9 + 8*8*9 + 4*8) + (8*16*9 + 16*16*9 + 8*16)
    per_member = 3 * 4 * 9 + 2 * (4 * 4 * 9) + (4 * 8 * 9 + 8 * 8 * 9 + 4 * 8) + (8 * 16 * 9 + 16 * 16 * 9 + 8 * 16)
    assert per_member == 4876
    assert weight_sparsity(model) == (0, 2 * per_member)
    m0, m1 = model.members
    with torch.no_grad():
        m0.layer2[0].conv2.weight[:3] = 0           # 3 * 8 * 9 = 216
        m1.conv1.weight[0, 0, 0, 0] = 0             # 1
        # not counted: the classifier, BN affine, biases (the paper's code dumps 4-D weights only)
        m1.linear.weight[2, :5] = 0
        m0.bn.weight.zero_()
        m0.layer1[0].bn1.bias.zero_()
        m1.linear.bias.zero_()
    assert weight_sparsity(model) == (216 + 1, 2 * per_member)
