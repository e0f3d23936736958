"""The grouped-convolution ensemble computes exactly what the member list computes (float64, noise off):
logits, gradients, one optimizer step, both conversions -- and each member's noise is scaled by its own std."""
import pytest
import torch
import torch.nn.functional as F

import models
from models.grouped import GroupedResidualNoise, to_grouped, to_members
from tests.helpers import randomized_model


def _pair(arch="test_resnet", n=3, normalize=True):
    torch.manual_seed(0)
    members = randomized_model(arch, n).double()
    if not normalize:
        members = models.create_model(arch, ensemble=n, noise_coef=0.1, normalize=False).double()
    return members, to_grouped(members)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_logits_equal(training, normalize):
    members, grouped = _pair(normalize=normalize)
    members.train(training), grouped.train(training)
    x = torch.rand(8, 3, 32, 32, dtype=torch.float64)
    with models.noise_disabled(members), models.noise_disabled(grouped), torch.no_grad():
        torch.testing.assert_close(grouped(x), members(x), rtol=0, atol=1e-12)


def test_gradients_and_one_sgd_step_equal():
    members, grouped = _pair()
    members.train(), grouped.train()
    x, y = torch.rand(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
            for m in (members, grouped)]
    with models.noise_disabled(members), models.noise_disabled(grouped):
        for model, opt in zip((members, grouped), opts):
            F.cross_entropy(model(x), y).backward()
    grads = {k: p.grad for k, p in grouped.named_parameters()}
    per_member = [dict(m.named_parameters()) for m in members.members]
    for key, g in grads.items():
        mkey = {"linear_weight": "linear.weight", "linear_bias": "linear.bias"}.get(key, key)
        parts = [p[mkey].grad for p in per_member]
        expected = torch.stack(parts) if key.startswith("linear_") else torch.cat(parts)
        torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-12, msg=key)
    for opt in opts:
        opt.step()
    back = to_members(grouped, models.create_model("test_resnet", ensemble=3).double())
    for (k, a), b in zip(members.state_dict().items(), back.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=k)


def test_round_trip_and_refusals():
    members, grouped = _pair("preact_resnet20", 2)
    back = to_members(grouped, models.create_model("preact_resnet20", ensemble=2).double())
    assert all(torch.equal(a, b) for a, b in zip(members.state_dict().values(), back.state_dict().values()))
    assert sum(p.numel() for p in grouped.parameters()) == sum(p.numel() for p in members.parameters())
    with torch.no_grad():   # a pruned ensemble has per-member widths: not expressible as one grouped net
        members.members[1].conv1 = torch.nn.Conv2d(3, 8, 3, 1, 1, bias=False)
    with pytest.raises(ValueError, match="one architecture"):
        to_grouped(members)


def test_each_member_is_scaled_by_its_own_std():
    n, c = 3, 4
    x = torch.randn(5, n * c, 6, 6, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1]).repeat_interleave(c).view(1, -1, 1, 1)
    noise = GroupedResidualNoise(0.1, n)
    torch.manual_seed(1)
    out = noise(x)
    torch.manual_seed(1)
    z = torch.randn_like(x)
    for i in range(n):
        block = slice(i * c, (i + 1) * c)
        expected = x[:, block] + 0.1 * x[:, block].std() * z[:, block]   # what ResidualNoise does per member
        torch.testing.assert_close(out[:, block], expected)
    with models.noise_disabled(torch.nn.Sequential(noise)):   # a ResidualNoise: the usual switch turns it off
        assert torch.equal(noise(x), x)


def test_grouped_model_trains_in_the_train_stage_and_saves_members(cifar_root, tmp_path):
    """train with model.ensemble_impl = "grouped": the saved checkpoint is a member list that loads as usual."""
    from pipeline.cli import main
    from pipeline.runio import load_model

    out = tmp_path / "run"
    assert main(["run", "--config", "configs/smoke.toml", "--until", "train", "--set", "model.ensemble_impl=grouped",
                 "--out", str(out)]) == 0
    model = load_model(out / "train" / "model.pt", out / "train" / "model.json")
    assert isinstance(model, models.Ensemble) and len(model.members) == 2
