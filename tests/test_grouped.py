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


@pytest.mark.parametrize("method", ["rgsm", "rvsm"])
def test_sparsifier_on_the_grouped_network_is_the_sparsifier_on_the_members(method):
    """RGSM's paper groups (per member conv input channel) and RVSM on the grouped network: the same group norms,
    and gradient, regularizer, SGD step, pull and epoch-end projection give the member list's weights."""
    from pipeline.algorithms.groups import paper_families
    from pipeline.algorithms.rgsm import RGSM
    from pipeline.algorithms.rvsm import RVSM

    members, grouped = _pair()
    with torch.no_grad():   # make some groups small, so the threshold drops some and keeps others
        for m in members.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight[:, ::2] *= 0.05
    grouped = to_grouped(members)
    members.train(), grouped.train()
    fam_m, fam_g = paper_families(members), paper_families(grouped)
    assert sum(f.width for f in fam_g) == sum(f.width for f in fam_m) == 3 * sum(f.width for f in paper_families(
        models.create_model("test_resnet", ensemble=1)))
    norms = lambda fams: torch.sort(torch.cat([f.sq_norms() for f in fams])).values  # noqa: E731
    torch.testing.assert_close(norms(fam_g), norms(fam_m), rtol=1e-12, atol=0)

    def make(fams):
        if method == "rgsm":
            return RGSM(fams, beta=1.0, lambda1=0.02, lambda2=1e-3)
        return RVSM([f.slices[0].tensor for f in fams], beta=1.0, lam=0.005)

    x, y = torch.rand(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
    for model, fams in ((members, fam_m), (grouped, fam_g)):
        sparsifier, opt = make(fams), torch.optim.SGD(model.parameters(), lr=0.1)
        with models.noise_disabled(model):
            F.cross_entropy(model(x), y).backward()
        sparsifier.regularize()
        opt.step()
        sparsifier.pull(0.1)
        sparsifier.end_epoch()
    back = to_members(grouped, models.create_model("test_resnet", ensemble=3).double())
    for (k, a), b in zip(members.state_dict().items(), back.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=k)
    zero = sum(int((f.sq_norms() == 0).sum()) for f in paper_families(members))
    assert 0 < zero < sum(f.width for f in fam_m)   # the projection dropped some groups, not all


def test_grouped_model_trains_and_prunes_in_the_stages_and_saves_members(cifar_root, tmp_path, capsys):
    """train and prune (RGSM) with model.ensemble_impl = "grouped": both checkpoints are member lists that load
    as usual, and the pruned one's zero channels are what the prune stage reported."""
    import json

    from pipeline.algorithms.sparsity import sparsity_metrics
    from pipeline.cli import main
    from pipeline.run.checkpoints import load_model

    out = tmp_path / "run"
    assert main(["run", "--config", "configs/smoke.toml", "--until", "prune", "--set", "model.ensemble_impl=grouped",
                 "--out", str(out)]) == 0
    model = load_model(out / "train" / "model.pt", out / "train" / "model.json")
    assert isinstance(model, models.Ensemble) and len(model.members) == 2
    pruned = load_model(out / "prune" / "model.pt", out / "prune" / "model.json")
    assert isinstance(pruned, models.Ensemble) and len(pruned.members) == 2
    reported = json.loads((out / "manifest.json").read_text())["stages"]["prune"]["metrics"]
    assert reported["zero_channels"] == sparsity_metrics(pruned)["zero_channels"] > 0
    assert "[prune] pruning the 2 members as one grouped-convolution network" in capsys.readouterr().out
