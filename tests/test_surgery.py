import io
import json

import pytest
import torch
import torch.nn as nn

import models
from pipeline.algorithms import surgery
from pipeline.algorithms.surgery import count_params_macs, remove_dead_channels
from tests.helpers import randomized_model

ARCH, KWARGS = "test_resnet", {"ensemble": 2, "noise_coef": 0.1}


def make_model(seed=0):
    """test_resnet En_2 (widths 4/8/16) with BN statistics and affines far from identity."""
    return randomized_model(ARCH, KWARGS["ensemble"], seed)


def example_input(seed=1):
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def zero_group(conv, i):
    with torch.no_grad():
        conv.weight[:, i] = 0


def logits(model, x):
    was_training = model.training
    with models.noise_disabled(model), torch.no_grad():
        out = model.eval()(x)
    model.train(was_training)
    return out


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def sparsify(model):
    """The hand-made RGSM outcome of test (1); returns the expected zero-group count."""
    m0, m1 = model.members
    zero_group(m0.layer2[0].conv2, 5)            # internal channel: conv1/bn2 out 5 of layer2.0 removable
    for conv in (m0.layer1[0].conv1, m0.layer2[0].conv1, m0.layer2[0].shortcut):
        zero_group(conv, 2)                      # stage-1 residual channel 2, dead in all three readers
    zero_group(m1.layer3[0].conv1, 3)            # stage-2 residual channel 3, still read by the shortcut
    zero_group(m1.conv1, 0)                      # an RGB input: zero, but the model input is never cut
    with torch.no_grad():
        m1.linear.weight[:, 7] = 0               # stage-3 residual channel 7: only reader is the linear
    return 6


def test_removes_exactly_the_dead_channels():
    model = make_model()
    expected_zero = sparsify(model)
    x = example_input()
    before = snapshot(model)
    dense_logits = logits(model, x)
    model.train()  # surgery must not depend on, nor change, the caller's mode

    res = remove_dead_channels(model, x)
    assert model.training and all(m.training for m in res.model.modules())

    # counts, in conv input-channel groups
    assert res.zero_channels == expected_zero
    assert res.total_channels == 2 * (3 + 4 + 4 + 4 + 8 + 4 + 8 + 16 + 8)
    assert res.removed_channels == 4
    assert res.removed_fraction == pytest.approx(4 / 6)
    assert res.kept_for_shape == 0

    p0, p1 = res.model.members
    assert p0.layer2[0].conv1.out_channels == 7 and p0.layer2[0].bn2.num_features == 7
    assert p0.layer2[0].conv2.in_channels == 7 and p0.layer2[0].conv2.out_channels == 8
    assert p0.conv1.out_channels == 3 and p0.conv1.in_channels == 3
    assert p0.layer1[0].bn1.num_features == 3 and p0.layer1[0].conv2.out_channels == 3
    assert p0.layer1[0].conv1.in_channels == 3
    assert p0.layer2[0].bn1.num_features == 3
    assert p0.layer2[0].conv1.in_channels == 3 and p0.layer2[0].shortcut.in_channels == 3
    assert p1.layer3[0].conv1.in_channels == 8 and p1.layer2[0].conv2.out_channels == 8
    assert p1.conv1.in_channels == 3
    assert p1.layer3[0].conv2.out_channels == 15 and p1.bn.num_features == 15
    assert p1.linear.in_features == 15 and p1.linear.out_features == 10
    assert p0.linear.in_features == 16

    # exact with noise off, and the survivors are the original weights
    assert res.max_abs_diff <= 1e-5
    assert (logits(res.model, x) - dense_logits).abs().max() <= 1e-5
    keep = [i for i in range(8) if i != 5]
    assert torch.equal(p0.layer2[0].conv2.weight, before["members.0.layer2.0.conv2.weight"][:, keep])

    # input untouched, modes and noise preserved
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.members[0].layer2[0].conv1.out_channels == 8
    assert all(n.enabled for n in res.model.modules() if isinstance(n, models.ResidualNoise))
    res.model(x)  # noisy forward still runs

    dense_params, dense_macs = count_params_macs(model)
    params, macs = count_params_macs(res.model)
    assert params < dense_params and macs < dense_macs
    assert dense_params == sum(p.numel() for p in model.parameters())


def test_nothing_to_remove():
    model = make_model(seed=3)
    x = example_input()
    res = remove_dead_channels(model, x)
    assert (res.removed_channels, res.zero_channels, res.kept_for_shape) == (0, 0, 0)
    assert res.removed_fraction == 0.0
    assert res.max_abs_diff == 0.0
    ref, new = model.state_dict(), res.model.state_dict()
    assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref)


def test_a_fully_dead_block_internal_layer_takes_its_branch_with_it():
    model = make_model(seed=4)
    conv2 = model.members[0].layer2[0].conv2
    for i in range(conv2.in_channels):
        zero_group(conv2, i)
    x = example_input()
    res = remove_dead_channels(model, x)
    assert res.zero_channels == 8
    # depth pruning: the branch adds exactly zero, so conv1, bn2 and conv2 go and the block is its shortcut
    assert res.removed_branches == ["members.0.layer2.0"]
    assert res.removed_channels == 8 and res.kept_for_shape == 0 and res.removed_fraction == 1.0
    pruned = res.model.members[0].layer2[0]
    assert pruned.conv1 is None and pruned.bn2 is None and pruned.conv2 is None and pruned.shortcut is not None
    assert res.max_abs_diff <= 1e-5


def test_a_fully_dead_stream_keeps_one_channel():
    model = make_model(seed=4)
    with torch.no_grad():
        model.members[0].linear.weight.zero_()       # nothing reads the last stage's residual stream any more
    res = remove_dead_channels(model, example_input())
    assert res.removed_branches == []
    member = res.model.members[0]
    assert member.linear.in_features == 1 and member.bn.num_features == 1   # a layer with 0 channels is not valid
    assert res.max_abs_diff <= 1e-5


def test_description_round_trip():
    model = make_model(seed=5)
    sparsify(model)
    x = example_input()
    pruned = remove_dead_channels(model, x).model

    desc = json.loads(json.dumps(models.describe(pruned, ARCH, KWARGS)))
    assert desc["shapes"]["members.1.linear"] == [15, 10]
    buf = io.BytesIO()
    torch.save(pruned.state_dict(), buf)
    buf.seek(0)
    rebuilt = models.build_from_description(desc)
    rebuilt.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(logits(rebuilt, x), logits(pruned, x))


def test_parity_violation_raises(monkeypatch):
    model = make_model(seed=6)
    sparsify(model)
    monkeypatch.setattr(surgery, "PARITY_TOL", -1.0)
    with pytest.raises(RuntimeError, match="changed the logits"):
        remove_dead_channels(model, example_input())
