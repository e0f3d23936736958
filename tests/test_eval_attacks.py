"""The evaluation attacks (paper columns, strong attacks, EOT) and the robustness sanity checks."""
import pytest
import torch

from pipeline.algorithms import attacks as A
from pipeline.algorithms.robustness import sanity_checks

from test_attacks import EPS_TOL, accuracy, assert_feasible, gen, near_edges, random_model, record_iterates
from test_attacks import trained  # noqa: F401  (fixture: a tiny model trained on a 2-class synthetic task)

EPS = 8 / 255


def every_attack(eps):
    """name -> (model, x, y) -> x_adv, each with small but non-trivial settings."""
    return {
        "fgsm": lambda m, x, y: A.fgsm(m, x, y, eps=eps),
        "ifgsm": lambda m, x, y: A.ifgsm(m, x, y, eps=eps, step=0.007, steps=5),
        "cw_paper": lambda m, x, y: A.cw_paper(m, x, y, eps=eps, steps=5),
        "pgd_restarts": lambda m, x, y: A.pgd_restarts(m, x, y, eps=eps, step=2 / 255, steps=4, restarts=2,
                                                       generator=gen(1)),
        "eot_pgd": lambda m, x, y: A.pgd(m, x, y, eps=eps, step=2 / 255, steps=3, eot_samples=3, generator=gen(2)),
        "apgd_ce": lambda m, x, y: A.apgd(m, x, y, eps=eps, steps=12, loss="ce", generator=gen(3)),
        "apgd_dlr": lambda m, x, y: A.apgd(m, x, y, eps=eps, steps=12, loss="dlr", generator=gen(4)),
    }


@pytest.mark.parametrize("name", list(every_attack(EPS)))
def test_every_iterate_stays_in_the_ball_and_the_box(monkeypatch, name):
    model = random_model(coef=0.1 if name == "eot_pgd" else 0.0)
    x = near_edges(seed=11)
    y = torch.randint(0, 10, (len(x),), generator=gen(12))
    iterates = record_iterates(monkeypatch)
    out = every_attack(EPS)[name](model, x, y)
    # C&W's iterates are its free variable w (only the rescaled result is an attack), so only its output counts
    for it in ([] if name == "cw_paper" else iterates) + [out]:
        if it.shape == x.shape:
            assert_feasible(it, x, EPS)
        else:   # a later restart attacks only the images still standing: check it against those
            assert float(it.min()) >= 0 and float(it.max()) <= 1
            assert any(float((it - x[i:i + 1]).abs().max()) <= EPS + EPS_TOL for i in range(len(x)))
    assert not torch.equal(out, x)
    if name != "cw_paper":
        assert len(iterates) >= 1


@pytest.mark.parametrize("name", list(every_attack(0.0)))
def test_eps_zero_gives_natural_accuracy(name):
    model = random_model()
    x = torch.rand(16, 3, 32, 32, generator=gen(0))
    y = model(x).argmax(1).detach()
    y[::2] = (y[::2] + 1) % 10      # half right, half wrong
    out = every_attack(0.0)[name](model, x, y)
    assert torch.allclose(out, x, atol=1e-7)
    assert accuracy(model, out, y) == accuracy(model, x, y) == 50.0


def test_dlr_loss_hand_worked():
    logits = torch.tensor([[4.0, 1.0, 2.0, 0.0], [1.0, 3.0, 0.0, 2.5]])
    y = torch.tensor([0, 0])
    # image 0 correct: -(4 - 2) / (4 - 1); image 1 wrong: -(1 - 3) / (3 - 1)
    torch.testing.assert_close(A.dlr_loss(logits, y), torch.tensor([-2 / 3, 1.0]))
    # shift and scale invariant
    torch.testing.assert_close(A.dlr_loss(3 * logits + 7, y), A.dlr_loss(logits, y))


def test_apgd_checkpoints_follow_the_paper():
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99
    assert A.apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_strong_not_above_ifgsm_not_above_fgsm(trained):
    model, x, y = trained
    eps = 24 / 255     # large enough that the attacks differ on this easy task
    acc_fgsm = accuracy(model, A.fgsm(model, x, y, eps=eps), y)
    acc_ifgsm = accuracy(model, A.ifgsm(model, x, y, eps=eps, step=eps / 4, steps=20), y)
    acc_pgd = accuracy(model, A.pgd_restarts(model, x, y, eps=eps, step=eps / 4, steps=50, restarts=2,
                                             generator=gen(0)), y)
    acc_apgd = accuracy(model, A.apgd(model, x, y, eps=eps, steps=50, generator=gen(0)), y)
    assert acc_pgd <= acc_ifgsm < acc_fgsm < accuracy(model, x, y)
    assert acc_apgd <= acc_ifgsm


def test_restarts_keep_the_worst_case_per_image(trained):
    model, x, y = trained
    eps = 16 / 255
    seen = []
    out = A.pgd_restarts(model, x, y, eps=eps, step=eps / 4, steps=5, restarts=3, generator=gen(0),
                         on_restart=lambda r, xa: seen.append(xa))
    fooled = [(model(s).argmax(1) != y) for s in seen]
    # once fooled, an image stays fooled: the fooled sets only grow
    assert all(bool((a <= b).all()) for a, b in zip(fooled, fooled[1:]))
    assert torch.equal(out, seen[-1])
    assert_feasible(out, x, eps)


def test_eot_gradient_has_lower_variance_than_one_sample():
    model = random_model(coef=0.5, ensemble=2)
    x = torch.rand(4, 3, 32, 32, generator=gen(0))
    y = torch.randint(0, 10, (4,), generator=gen(1))
    torch.manual_seed(0)

    def spread(k, draws=8):
        grads = torch.stack([A._value_and_grad(model, x, y, "ce", k)[1] for _ in range(draws)])
        return float(grads.var(0).mean())

    one, eot = spread(1), spread(8)
    assert eot < one / 3, (one, eot)   # averaging 8 draws should cut the variance about 8x


def test_cw_finds_adversarial_examples_on_an_undefended_model():
    torch.manual_seed(0)
    model = random_model(seed=3)
    x = torch.rand(32, 3, 32, 32, generator=gen(5))
    pred = model(x).argmax(1)
    # A random model's logits barely depend on the input, so the margin term needs a larger weight than 10.
    w = A.cw_l2(model, x, c=100.0, lr=0.01, steps=100)
    flipped = float((model(w).argmax(1) != pred).float().mean())
    assert flipped > 0.9, flipped
    assert float(w.min()) >= 0 and float(w.max()) <= 1
    # the paper variant rescales by eps: a much smaller perturbation than C&W's own
    out = A.cw_paper(model, x, eps=0.031, c=100.0, lr=0.01, steps=100)
    assert float((out - x).abs().max()) <= 0.031 * float((w - x).abs().max()) + EPS_TOL


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_agrees_with_torchattacks(trained, loss):
    """Cross-check against torchattacks' APGD (a port of Croce & Hein's code). Both start at random points, so
    agreement is statistical: robust accuracy within 3 points (4 images) on 128 images."""
    torchattacks = pytest.importorskip("torchattacks", reason="torchattacks is a dev dependency (pyproject [dev])")
    model, x, y = trained
    for e in (24, 32):
        eps = e / 255
        ours = accuracy(model, A.apgd(model, x, y, eps=eps, steps=25, loss=loss, generator=gen(0)), y)
        torch.manual_seed(0)
        theirs = accuracy(model, torchattacks.APGD(model, eps=eps, steps=25, loss=loss, seed=0)(x, y), y)
        assert abs(ours - theirs) <= 3.0, (e, ours, theirs)
        assert ours < accuracy(model, x, y)


STRONG = ("pgd", "eot_pgd", "apgd_ce", "apgd_dlr")


def test_sanity_checks_catch_a_broken_attack():
    res = {"images": 500, "natural": 50.0, "noise_flip_rate": 0.0,
           "attacks": {"fgsm": {"accuracy": 30.0}, "ifgsm": {"accuracy": 35.0},
                       "pgd": {"accuracy": 20.0, "accuracy_first_restart": 22.0}, "eot_pgd": {"accuracy": 25.0}},
           "sweep": [{"eps_255": 0, "accuracy": 49.0}, {"eps_255": 2, "accuracy": 40.0},
                     {"eps_255": 4, "accuracy": 41.5}]}
    bad = {c["check"] for c in sanity_checks(res, stochastic=False, slack_pt=1.0, paper_eps=0.031,
                                              strong_eps=8 / 255, strong=STRONG) if not c["ok"]}
    assert bad == {"eps0_equals_natural", "ifgsm_not_above_fgsm", "sweep_eps4_not_above_eps2",
                   "eot_not_above_single_sample"}
    fine = {**res, "attacks": {**res["attacks"], "ifgsm": {"accuracy": 28.0}, "eot_pgd": {"accuracy": 21.0}},
            "sweep": [{"eps_255": 0, "accuracy": 50.0}, {"eps_255": 2, "accuracy": 40.0}]}
    assert all(c["ok"] for c in sanity_checks(fine, stochastic=False, slack_pt=1.0, paper_eps=0.031,
                                              strong_eps=8 / 255, strong=STRONG))


def test_cascade_has_the_full_worst_case_per_image_and_attacks_only_the_survivors(trained):
    """AutoAttack's convention: each attack only on the images no earlier attack broke, cheapest first; on a
    deterministic model the worst case is the full mode's, image for image (random starts are per image)."""
    import dataclasses

    from pipeline.algorithms.robustness import correct_mask, evaluate_model
    from pipeline.catalog.attacks import attack_specs
    from pipeline.config import load_config

    model, x, y = trained
    e = load_config(None, ['eval.attacks=["apgd_dlr", "pgd", "ifgsm", "fgsm"]', "eval.eps_255=16",
                           "eval.step_255=4", "eval.pgd_steps=5", "eval.pgd_restarts=2", "eval.apgd_steps=12",
                           "eval.ifgsm_steps=3", "eval.paper_eps_01=0.02"]).eval
    kw = dict(stochastic=False, batch_size=32, avg_passes=1, sweep_eps_255=(0, 16), sweep_steps=3, seed=3,
              log=lambda m: None, keep_examples=("apgd_dlr", "pgd", "ifgsm", "fgsm"))
    full, per_attack = evaluate_model(model, x, y, attack_specs(e), **kw)
    natural = correct_mask(model, x, y, batch_size=32)
    robust_full = natural.clone()
    for examples in per_attack.values():
        robust_full &= correct_mask(model, examples, y, batch_size=32)
    assert 0 < robust_full.sum() < natural.sum(), "the attacks should break some images and not all"

    cascade = dataclasses.replace(e, mode="cascade")
    specs = attack_specs(cascade)
    assert list(specs) == ["fgsm", "ifgsm", "pgd", "apgd_dlr"]   # cheapest first: 1, 3, 5x2, 12 gradients
    received = {}

    def spy(name, run):
        def attack(m, xb, yb, g):
            received.setdefault(name, []).extend(g.ids.tolist())     # the image ids of its per-image streams
            return run(m, xb, yb, g)
        return attack
    specs = {k: dataclasses.replace(s, run=spy(k, s.run)) for k, s in specs.items()}
    res, kept = evaluate_model(model, x, y, specs, **kw, cascade=True)
    robust_cascade = natural & correct_mask(model, kept["worst_case"], y, batch_size=32)
    assert torch.equal(robust_cascade, robust_full)                        # image for image
    assert res["worst_case"] == full["worst_case"]
    standing = natural.clone()
    for name in specs:
        assert sorted(received.get(name, [])) == standing.nonzero().squeeze(1).tolist(), name
        standing &= correct_mask(model, per_attack[name], y, batch_size=32)
        assert res["attacks"][name]["accuracy"] == 100.0 * float(standing.float().mean())   # cumulative
    assert sum(r["attacked"] for r in res["attacks"].values()) < sum(r["attacked"] for r in full["attacks"].values())
