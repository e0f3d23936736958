import pytest
import torch
import torch.nn.functional as F

import models
from models import noise_disabled
from pipeline.algorithms import attacks
from pipeline.algorithms.attacks import fgsm_rs, make_attack, pgd

EPS_TOL = 1e-6  # float32 rounding of x ± eps


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def near_edges(n=8, seed=0):
    """Pixels within 0.02 of 0 or of 1, so that both the eps-ball and the [0, 1] box clip."""
    g = gen(seed)
    low = torch.rand(n, 3, 32, 32, generator=g) * 0.02
    high = 1 - torch.rand(n, 3, 32, 32, generator=g) * 0.02
    pick = torch.rand(n, 3, 32, 32, generator=g) < 0.5
    return torch.where(pick, low, high)


def random_model(coef=0.0, seed=0, ensemble=1):
    torch.manual_seed(seed)
    return models.create_model("test_resnet", ensemble=ensemble, noise_coef=coef).eval()


def accuracy(model, x, y):
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def assert_feasible(x_adv, x, eps):
    assert x_adv.shape == x.shape
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float((x_adv - x).abs().max()) <= eps + EPS_TOL


def record_iterates(monkeypatch) -> list:
    """Every point at which any attack asks for a gradient, appended to the returned list."""
    iterates = []
    real = attacks._value_and_grad

    def recording(model_, x_, y_, loss, eot):
        iterates.append(x_.detach().clone())
        return real(model_, x_, y_, loss, eot)

    monkeypatch.setattr(attacks, "_value_and_grad", recording)
    return iterates


@pytest.mark.parametrize("random_start", [True, False])
def test_every_pgd_iterate_is_feasible(monkeypatch, random_start):
    model = random_model()
    x = near_edges()
    y = torch.randint(0, 10, (len(x),), generator=gen(1))
    eps, step, steps = 8 / 255, 6 / 255, 6   # large steps: the projection has work to do
    iterates = record_iterates(monkeypatch)
    out = pgd(model, x, y, eps=eps, step=step, steps=steps, random_start=random_start, generator=gen(2))
    iterates.append(out)
    assert len(iterates) == steps + 1
    for it in iterates:
        assert_feasible(it, x, eps)
    # The constraints were active (otherwise this test would prove nothing).
    final = iterates[-1]
    assert bool(((final == 0) | (final == 1)).any())
    assert bool(((final - x).abs() > eps - EPS_TOL).any())
    assert not torch.equal(final, x)
    if not random_start:
        assert torch.equal(iterates[0], x)


def test_pgd_prefixes_are_feasible_and_deterministic():
    """pgd with steps = 1..k from the same generator: each output is the k-th iterate, all feasible."""
    model = random_model()
    x = near_edges(seed=5)
    y = torch.randint(0, 10, (len(x),), generator=gen(6))
    eps = 4 / 255
    outs = [pgd(model, x, y, eps=eps, step=3 / 255, steps=k, generator=gen(3)) for k in range(1, 5)]
    for o in outs:
        assert_feasible(o, x, eps)
    again = pgd(model, x, y, eps=eps, step=3 / 255, steps=4, generator=gen(3))
    assert torch.equal(outs[-1], again)
    assert not torch.equal(outs[0], outs[-1])


def test_pgd_random_start_uses_generator():
    model = random_model()
    x = near_edges(seed=7)
    y = torch.zeros(len(x), dtype=torch.long)
    a = pgd(model, x, y, eps=8 / 255, step=2 / 255, steps=1, generator=gen(1))
    b = pgd(model, x, y, eps=8 / 255, step=2 / 255, steps=1, generator=gen(2))
    assert not torch.equal(a, b)


def test_eps_zero_returns_input_and_natural_accuracy():
    model = random_model()
    x = torch.rand(16, 3, 32, 32, generator=gen(0))
    y = torch.randint(0, 10, (16,), generator=gen(1))
    out = pgd(model, x, y, eps=0.0, step=2 / 255, steps=10, generator=gen(2))
    assert torch.equal(out, x)
    assert out.data_ptr() != x.data_ptr()   # a copy: the caller's tensor is never aliased
    assert accuracy(model, out, y) == accuracy(model, x, y)
    assert torch.equal(fgsm_rs(model, x, y, eps=0.0, generator=gen(2)), x)
    assert make_attack("pgd", eps=0.0, step=0.0, steps=10) is None


def test_steps_zero_returns_input():
    model = random_model()
    x = torch.rand(4, 3, 32, 32, generator=gen(0))
    y = torch.zeros(4, dtype=torch.long)
    assert torch.equal(pgd(model, x, y, eps=8 / 255, step=2 / 255, steps=0, generator=gen(0)), x)


# --------------------------------------------------------------------------- a model with something to attack

def _synthetic(n, seed):
    """Two classes told apart by mean brightness m ~ U(0.3, 0.7): label = m > 0.5. A fraction of the points lie
    within eps of the boundary, so a correct attack must lower accuracy as eps grows."""
    g = gen(seed)
    m = torch.rand(n, generator=g) * 0.4 + 0.3
    x = (m.view(n, 1, 1, 1) + 0.05 * torch.randn(n, 3, 32, 32, generator=g)).clamp(0, 1)
    return x, (m > 0.5).long()


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = models.create_model("test_resnet", ensemble=1, noise_coef=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for i in range(40):
        x, y = _synthetic(64, 100 + i)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = _synthetic(128, 1)
    return model, x, y


def test_accuracy_non_increasing_in_eps(trained):
    model, x, y = trained
    natural = accuracy(model, x, y)
    assert natural > 90.0, "the synthetic task should be learnt (otherwise the ordering below is vacuous)"
    accs = []
    for e in (0, 2, 8, 16):
        eps = e / 255
        x_adv = pgd(model, x, y, eps=eps, step=eps / 4, steps=10, generator=gen(0))
        accs.append(accuracy(model, x_adv, y))
    assert accs[0] == natural
    assert all(a >= b for a, b in zip(accs, accs[1:])), accs
    assert accs[-1] < natural, f"PGD at 16/255 did not hurt at all: {accs}"


def test_pgd10_not_weaker_than_fgsm(trained):
    model, x, y = trained
    eps = 8 / 255
    acc_pgd = accuracy(model, pgd(model, x, y, eps=eps, step=eps / 4, steps=10, generator=gen(0)), y)
    acc_fgsm = accuracy(model, pgd(model, x, y, eps=eps, step=eps, steps=1, random_start=False), y)
    acc_fgsm_rs = accuracy(model, fgsm_rs(model, x, y, eps=eps, generator=gen(0)), y)
    assert acc_pgd <= acc_fgsm
    assert acc_pgd <= acc_fgsm_rs
    assert acc_fgsm < accuracy(model, x, y)


def test_attack_ascends_the_loss(trained):
    model, x, y = trained
    eps = 8 / 255
    x_adv = pgd(model, x[:32], y[:32], eps=eps, step=2 / 255, steps=5, random_start=False)
    x, y = x[:32], y[:32]
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)


# --------------------------------------------------------------------------- EOT

def test_eot_identical_without_noise():
    model = random_model(coef=0.0, ensemble=2)
    x = torch.rand(8, 3, 32, 32, generator=gen(0))
    y = torch.randint(0, 10, (8,), generator=gen(1))
    kw = dict(eps=8 / 255, step=2 / 255, steps=3)
    a = pgd(model, x, y, eot_samples=1, generator=gen(5), **kw)
    b = pgd(model, x, y, eot_samples=4, generator=gen(5), **kw)
    assert torch.equal(a, b)


def test_eot_runs_k_forward_passes_per_step():
    model = random_model(coef=0.1)
    calls = []
    h = model.register_forward_hook(lambda m, a, o: calls.append(1))
    x = torch.rand(2, 3, 32, 32, generator=gen(0))
    y = torch.zeros(2, dtype=torch.long)
    pgd(model, x, y, eps=8 / 255, step=2 / 255, steps=3, eot_samples=5, generator=gen(0))
    h.remove()
    assert len(calls) == 15


def test_eot_gradient_is_average_over_noise_samples():
    """_value_and_grad with k samples returns the mean of k single-sample gradients (same noise draws)."""
    model = random_model(coef=0.3)
    x = torch.rand(4, 3, 32, 32, generator=gen(0))
    y = torch.randint(0, 10, (4,), generator=gen(1))
    k = 3
    torch.manual_seed(123)
    eot = attacks._value_and_grad(model, x, y, "ce", k)[1]
    torch.manual_seed(123)   # the same noise draws, one forward/backward each
    singles = [attacks._value_and_grad(model, x, y, "ce", 1)[1] for _ in range(k)]
    mean = torch.stack(singles).mean(0)
    # the samples really differ, so this is not the coef-0 case again
    assert not torch.allclose(singles[0], singles[1])
    scale = float(mean.abs().max())
    torch.testing.assert_close(eot, mean, rtol=0, atol=1e-5 * scale)


# --------------------------------------------------------------------------- FGSM / make_attack

def test_fgsm_rs_default_step_is_1_25_eps(monkeypatch):
    model = random_model()
    x = torch.rand(4, 3, 32, 32, generator=gen(0))
    y = torch.randint(0, 10, (4,), generator=gen(1))
    eps = 8 / 255
    out = fgsm_rs(model, x, y, eps=eps, generator=gen(9))
    ref = pgd(model, x, y, eps=eps, step=1.25 * eps, steps=1, random_start=True, generator=gen(9))
    other = pgd(model, x, y, eps=eps, step=eps, steps=1, random_start=True, generator=gen(9))
    assert torch.equal(out, ref)
    assert not torch.equal(out, other)
    assert_feasible(out, x, eps)
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return args[1]

    monkeypatch.setattr(attacks, "pgd", spy)
    attacks.fgsm_rs(model, x, y, eps=eps)
    assert seen["step"] == pytest.approx(1.25 * eps) and seen["steps"] == 1 and seen["random_start"] is True
    attacks.fgsm_rs(model, x, y, eps=eps, step=0.5 * eps)
    assert seen["step"] == pytest.approx(0.5 * eps)


def test_make_attack():
    assert make_attack("none", eps=8 / 255, step=2 / 255, steps=10) is None
    with pytest.raises(ValueError):
        make_attack("cw", eps=8 / 255, step=2 / 255, steps=10)
    model = random_model()
    x = torch.rand(4, 3, 32, 32, generator=gen(0))
    y = torch.randint(0, 10, (4,), generator=gen(1))
    atk = make_attack("pgd", eps=4 / 255, step=1 / 255, steps=3)
    assert torch.equal(atk(model, x, y, gen(3)),
                       pgd(model, x, y, eps=4 / 255, step=1 / 255, steps=3, generator=gen(3)))
    fg = make_attack("fgsm_rs", eps=4 / 255, step=1 / 255, steps=3)
    assert torch.equal(fg(model, x, y, gen(3)), fgsm_rs(model, x, y, eps=4 / 255, generator=gen(3)))


def test_pgd_leaves_model_mode_and_noise_untouched():
    model = random_model(coef=0.1)
    model.train()
    x = torch.rand(2, 3, 32, 32, generator=gen(0))
    with noise_disabled(model):
        pgd(model, x, torch.zeros(2, dtype=torch.long), eps=2 / 255, step=1 / 255, steps=1, generator=gen(0))
    assert model.training
    assert all(p.grad is None for p in model.parameters())
