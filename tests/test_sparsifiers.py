"""RVSM, RGSM's soft prox, projection ADMM and the paper's sparsity accounting, pinned on hand-worked tensors."""
import math

import pytest
import torch

import models
from pipeline.algorithms.admm import ADMM, channel_projection, elem_projection
from pipeline.algorithms.rgsm import RGSM, group_hard_threshold, group_soft_threshold
from pipeline.algorithms.rvsm import RVSM, rvsm_prox, tl1_cutoff, tl1_threshold
from pipeline.algorithms.sparsity import channel_sparsity, channel_weight_sparsity, sparsity_metrics, weight_sparsity

W = torch.tensor([0.5, -0.05, 0.2, -0.3], dtype=torch.float64)


# --------------------------------------------------------------------------- elementwise proxes (RVSM)
def test_l0_prox_is_hard_threshold_at_sqrt_2_lambda_over_beta():
    # lambda 0.02, beta 1: threshold sqrt(0.04) = 0.2; |w| = 0.2 is dropped (">" keeps)
    assert rvsm_prox(W, "l0", 0.02, 1.0).tolist() == [0.5, 0.0, 0.0, -0.3]
    # lambda 0.02, beta 4: threshold sqrt(0.01) = 0.1
    assert rvsm_prox(W, "l0", 0.02, 4.0).tolist() == [0.5, 0.0, 0.2, -0.3]


def test_l1_prox_is_soft_threshold_at_lambda_over_beta():
    torch.testing.assert_close(rvsm_prox(W, "l1", 0.1, 1.0), torch.tensor([0.4, 0.0, 0.1, -0.2], dtype=torch.float64))
    torch.testing.assert_close(rvsm_prox(W, "l1", 0.1, 2.0), torch.tensor([0.45, 0.0, 0.15, -0.25], dtype=torch.float64))


def test_tl1_cutoff_in_both_regimes():
    # t <= a^2 / (2(a+1)): cutoff t(a+1)/a; above: sqrt(2t(a+1)) - a/2
    assert tl1_cutoff(0.1, 1.0) == pytest.approx(0.2)
    assert tl1_cutoff(1.0, 1.0) == pytest.approx(1.5)
    assert tl1_cutoff(0.01, 0.1) == pytest.approx(math.sqrt(0.022) - 0.05)   # 0.01 > 0.01/2.2: second branch
    assert tl1_cutoff(0.001, 0.1) == pytest.approx(0.011)      # first branch


@pytest.mark.parametrize("t,a", [(0.1, 1.0), (1.0, 1.0), (0.02, 0.1), (0.3, 5.0)])
def test_tl1_prox_equals_brute_force_argmin(t, a):
    """The closed form against min_v t(a+1)|v|/(a+|v|) + (v - w)^2/2 on a fine grid."""
    # offset so that no w sits exactly on the cutoff, where 0 and g(w) tie
    w = torch.linspace(-3, 3, 61, dtype=torch.float64) + 0.0123
    v = torch.linspace(-3.5, 3.5, 140_001, dtype=torch.float64)
    penalty = t * (a + 1) * v.abs() / (a + v.abs())
    best = torch.stack([v[torch.argmin(penalty + 0.5 * (v - x) ** 2)] for x in w])
    torch.testing.assert_close(tl1_threshold(w, t, a), best, atol=1e-4, rtol=0)
    assert (tl1_threshold(w, t, a)[w.abs() <= tl1_cutoff(t, a) - 1e-9] == 0).all()


def test_tl1_tends_to_l1_for_large_a():
    w = torch.tensor([0.05, 0.3, -1.0], dtype=torch.float64)
    torch.testing.assert_close(tl1_threshold(w, 0.1, 1e6), rvsm_prox(w, "l1", 0.1, 1.0), atol=1e-5, rtol=0)


def test_rvsm_pull_and_project():
    w = torch.tensor([0.5, -0.05, 0.2, -0.3])
    r = RVSM([w], beta=1.0, lam=0.02, penalty="l0")
    assert r.threshold == pytest.approx(0.2)
    r.pull(lr=0.1)                     # w - 0.1 * 1 * (w - u): only dropped weights move, by 10 %
    torch.testing.assert_close(w, torch.tensor([0.5, -0.045, 0.18, -0.3]))
    r.project()
    assert w.tolist() == [0.5, 0.0, 0.0, -0.30000001192092896]
    assert r.state_dict()["projections"] == 1


# --------------------------------------------------------------------------- group proxes (RGSM)
def _two_groups():
    # W [C_out=2, C_in=2, 1, 1]: input group 0 = (3, 4) (norm 5), group 1 = (0.6, 0.8) (norm 1)
    return torch.tensor([[3.0, 0.6], [4.0, 0.8]]).view(2, 2, 1, 1)


def test_group_hard_and_soft_thresholds():
    w = _two_groups()
    assert group_hard_threshold(w, 1.0).flatten().tolist() == [3.0, 0.0, 4.0, 0.0]   # norm 1 is not > 1
    torch.testing.assert_close(group_soft_threshold(w, 2.0).flatten(), torch.tensor([1.8, 0.0, 2.4, 0.0]))
    torch.testing.assert_close(group_soft_threshold(w, 0.5).flatten(), torch.tensor([2.7, 0.3, 3.6, 0.4]))


def test_rgsm_soft_prox_projects_to_shrunk_groups():
    w = _two_groups()
    r = RGSM([w], beta=2.0, lambda1=1.0, lambda2=0.0, prox="soft")    # threshold lambda1/beta = 0.5
    assert r.threshold == pytest.approx(0.5)
    r.project()
    torch.testing.assert_close(w.flatten(), torch.tensor([2.7, 0.3, 3.6, 0.4]))
    hard = _two_groups()
    RGSM([hard], beta=2.0, lambda1=1.0, lambda2=0.0).project()         # threshold sqrt(2*1/2) = 1: drops group 1
    assert hard.flatten().tolist() == [3.0, 0.0, 4.0, 0.0]
    with pytest.raises(ValueError, match="no aligned variant"):
        RGSM([_two_groups()], beta=1.0, lambda1=1.0, lambda2=0.0, prox="soft", align=2)


# --------------------------------------------------------------------------- ADMM
def test_elem_projection_uses_percentile_of_magnitudes():
    w = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0])
    # 40th percentile of |w| = (1,2,3,4,5) is 2.6 (linear interpolation, numpy's default)
    assert elem_projection(w, 40).tolist() == [0.0, 0.0, 3.0, -4.0, 5.0]
    # the reference's bug -- the percentile of *signed* w (-0.2 here) -- would zero nothing
    assert float(torch.quantile(w, 0.4)) == pytest.approx(-0.2)
    assert elem_projection(w, 0).tolist() == w.tolist()


def test_channel_projection_by_group_norm_percentile():
    w = torch.tensor([[1.0, 0.0, 3.0, 0.0], [0.0, 2.0, 0.0, 4.0]]).view(2, 4, 1, 1)   # group norms 1, 2, 3, 4
    # 50th percentile = 2.5: groups at or below it go
    assert channel_projection(w, 50).view(2, 4).tolist() == [[0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 4.0]]
    # 25th percentile = 1.75
    assert channel_projection(w, 25).view(2, 4).tolist() == [[0.0, 0.0, 3.0, 0.0], [0.0, 2.0, 0.0, 4.0]]


def test_admm_steps_by_hand():
    w = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0])
    a = ADMM([w], rho=1.0, percentile=40)
    assert a.z[0].tolist() == [0.0, 0.0, 3.0, -4.0, 5.0] and a.u[0].tolist() == [0.0] * 5
    a.before_batch()                  # z = Proj(w + u) = Proj(w); u = u + w - z
    assert a.u[0].tolist() == [1.0, -2.0, 0.0, 0.0, 0.0]
    a.pull(lr=0.1)                    # w -= lr * rho * (w - z + u), once per tensor
    torch.testing.assert_close(w, torch.tensor([0.8, -1.6, 3.0, -4.0, 5.0]))
    a.end_epoch(last=False)           # the dual resets every epoch; w is not projected
    assert a.u[0].tolist() == [0.0] * 5 and w[0] != 0
    a.end_epoch(last=True)            # final projection: really sparse
    assert w.tolist() == [0.0, 0.0, 3.0, -4.0, 5.0]


def test_admm_state_roundtrip():
    w = torch.randn(4, 3, 3, 3)
    a = ADMM([w], rho=0.01, percentile=50, sparsity="channel")
    a.before_batch()
    b = ADMM([w.clone()], rho=1.0, percentile=10)
    b.load_state_dict(a.state_dict())
    assert (b.rho, b.percentile, b.sparsity) == (0.01, 50, "channel")
    torch.testing.assert_close(b.u[0], a.u[0])


# --------------------------------------------------------------------------- sparsity accounting
# The reference's dump of its Table 2 ResNet20 RGSM model (net_rgsm.txt): zero input channels per conv, in order.
REFERENCE_DUMP = {
    "conv1": 0,
    "layer1.0.conv1": 9, "layer1.0.conv2": 6, "layer1.1.conv1": 11, "layer1.1.conv2": 8,
    "layer1.2.conv1": 16, "layer1.2.conv2": 16,
    "layer2.0.conv1": 5, "layer2.0.conv2": 7, "layer2.0.shortcut": 16,
    "layer2.1.conv1": 11, "layer2.1.conv2": 12, "layer2.2.conv1": 13, "layer2.2.conv2": 9,
    "layer3.0.conv1": 0, "layer3.0.conv2": 0, "layer3.0.shortcut": 30,
    "layer3.1.conv1": 2, "layer3.1.conv2": 0, "layer3.2.conv1": 0, "layer3.2.conv2": 0,
}


def test_reference_dump_counts():
    """171/675 zero channels = 25.333 % and channel-induced weight sparsity 10.917 %, as the reference printed."""
    model = models.create_model("preact_resnet20", ensemble=1, noise_coef=0.0)
    member = model.members[0]
    with torch.no_grad():
        for name, zero in REFERENCE_DUMP.items():
            member.get_submodule(name).weight[:, :zero] = 0
    assert channel_sparsity(model) == (171, 675)
    assert 100 * 171 / 675 == pytest.approx(25.333, abs=1e-3)
    zero_w, conv_w = channel_weight_sparsity(model)
    # sum of zero groups x C_out*k*k: layer1 66*144 + 5*288 + 7*288 + 16*32 + 45*288 + 30*64 + 2*576
    assert (zero_w, conv_w) == (29504, 270256)
    assert 100 * zero_w / conv_w == pytest.approx(10.917, abs=1e-3)
    # exact zeros agree here (only whole groups are zero); the classifier is not in either denominator
    assert weight_sparsity(model) == (29504, 270256)
    m = sparsity_metrics(model)
    assert m["channel_sparsity"] == pytest.approx(25.3333, abs=1e-4)
    assert m["channel_weight_sparsity"] == pytest.approx(10.9171, abs=1e-4)


def test_channel_induced_and_exact_weight_sparsity_differ_for_unstructured_zeros():
    model = models.create_model("test_resnet", ensemble=1)
    conv = model.members[0].layer1[0].conv1          # [4, 4, 3, 3]
    with torch.no_grad():
        conv.weight[:, 0] = 0                        # one whole input group: 36 weights
        conv.weight[0, 1] = 0                        # 9 more weights, group 1 still alive
    assert channel_weight_sparsity(model)[0] == 36
    assert weight_sparsity(model)[0] == 45
    assert channel_sparsity(model)[0] == 1
    assert math.isclose(sparsity_metrics(model)["weight_sparsity"], 100 * 45 / 4876)
