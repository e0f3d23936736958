"""Every configs/paper/*.toml resolves and reproduces exactly the table row it names.

The rows below are transcribed from the paper's Tables 1-4 (../shared/paper/README.md, section 3), independently
of the configs; a config whose hyper-parameters or stored numbers drift from its row fails here."""
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config

PAPER = Path(__file__).resolve().parent.parent / "configs" / "paper"
R20, R38 = "preact_resnet20", "preact_resnet38"

# row -> (arch, ensemble, method, method hyper-parameters, (A1, A2, A3, A4), {sparsity kind: value})
ROWS = {
    "Tables 1, 2, 4: ResNet20, dense (n/a)": (R20, 1, "none", {}, (76.07, 51.24, 47.25, 59.30), {}),
    "Tables 1, 2, 3: En2ResNet20, dense (n/a)": (R20, 2, "none", {}, (80.34, 57.11, 50.02, 66.77), {}),
    "Table 2: En5ResNet20, dense (n/a)": (R20, 5, "none", {}, (81.41, 58.21, 51.60, 66.48), {}),
    "Table 3: ResNet38, dense (n/a)": (R38, 1, "none", {}, (78.03, 54.09, 49.81, 61.72), {}),
    # Table 1: RVSM, lambda = 1e-6
    "Tables 1, 4: ResNet20, RVSM beta=0.01 lambda=1e-6": (R20, 1, "rvsm", {"beta": 0.01}, (70.26, 46.68, 43.79, 55.59),
                                                          {"weight_sparsity": 80.91}),
    "Table 1: ResNet20, RVSM beta=0.1 lambda=1e-6": (R20, 1, "rvsm", {"beta": 0.1}, (73.45, 49.48, 45.79, 57.72),
                                                     {"weight_sparsity": 56.88}),
    "Table 1: ResNet20, RVSM beta=0.5 lambda=1e-6": (R20, 1, "rvsm", {"beta": 0.5}, (74.08, 50.64, 46.67, 57.24),
                                                     {"weight_sparsity": 39.92}),
    "Table 1: En2ResNet20, RVSM beta=0.01 lambda=1e-6": (R20, 2, "rvsm", {"beta": 0.01}, (72.81, 51.98, 46.62, 63.10),
                                                         {"weight_sparsity": 89.86}),
    "Table 1: En2ResNet20, RVSM beta=0.1 lambda=1e-6": (R20, 2, "rvsm", {"beta": 0.1}, (77.78, 55.48, 49.26, 65.56),
                                                        {"weight_sparsity": 70.55}),
    "Table 1: En2ResNet20, RVSM beta=0.5 lambda=1e-6": (R20, 2, "rvsm", {"beta": 0.5}, (78.47, 56.13, 49.54, 65.57),
                                                        {"weight_sparsity": 56.34}),
    # Tables 2 and 3: RGSM, beta = 1, lambda2 = 1e-5
    "Table 2: ResNet20, RGSM beta=1 lambda1=5e-2 lambda2=1e-5": (R20, 1, "rgsm", {"lambda1": 5e-2},
                                                                 (75.91, 51.52, 47.14, 58.77), {"channel_sparsity": 8.00}),
    "Tables 2, 4 (headline): ResNet20, RGSM beta=1 lambda1=1e-1 lambda2=1e-5": (
        R20, 1, "rgsm", {"lambda1": 1e-1}, (71.84, 48.23, 45.21, 57.09), {"channel_sparsity": 25.33}),
    "Tables 2, 3: En2ResNet20, RGSM beta=1 lambda1=5e-2 lambda2=1e-5": (
        R20, 2, "rgsm", {"lambda1": 5e-2}, (78.28, 56.53, 49.58, 66.56), {"channel_sparsity": 41.48}),
    "Tables 2, 3: En2ResNet20, RGSM beta=1 lambda1=1e-1 lambda2=1e-5": (   # Table 3 prints A1 76.30
        R20, 2, "rgsm", {"lambda1": 1e-1}, (75.87, 54.65, 47.77, 65.41), {"channel_sparsity": 56.74}),
    "Table 2: En5ResNet20, RGSM beta=1 lambda1=1e-2 lambda2=1e-5": (
        R20, 5, "rgsm", {"lambda1": 1e-2}, (81.46, 58.34, 51.35, 66.84), {"channel_sparsity": 19.76}),
    "Table 2 (headline): En5ResNet20, RGSM beta=1 lambda1=2e-2 lambda2=1e-5": (
        R20, 5, "rgsm", {"lambda1": 2e-2}, (80.53, 57.38, 50.63, 66.52), {"channel_sparsity": 53.36}),
    "Table 3: ResNet38, RGSM beta=1 lambda1=5e-2 lambda2=1e-5": (
        R38, 1, "rgsm", {"lambda1": 5e-2}, (77.92, 53.51, 49.35, 60.32), {"channel_sparsity": 17.67}),
    "Table 3: ResNet38, RGSM beta=1 lambda1=1e-1 lambda2=1e-5": (
        R38, 1, "rgsm", {"lambda1": 1e-1}, (72.95, 49.78, 46.48, 57.92), {"channel_sparsity": 43.80}),
    # Table 4: ADMM (the percentile used is not stated in the paper)
    "Table 4: ResNet20, ADMM elem": (R20, 1, "admm", {"sparsity": "elem"}, (71.55, 47.37, 44.30, 55.79),
                                     {"weight_sparsity": 10.92}),
    "Table 4: ResNet20, ADMM channel": (R20, 1, "admm", {"sparsity": "channel"}, (63.99, 42.06, 39.75, 51.90),
                                        {"channel_sparsity": 4.44}),
}
CONFIGS = sorted(PAPER.glob("*.toml"))


def test_every_row_has_exactly_one_config():
    rows = [load_config(p).paper.row for p in CONFIGS]
    assert sorted(rows) == sorted(ROWS), "configs/paper and the transcribed rows differ"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_show_config_resolves(path, capsys):
    assert main(["show-config", "--config", str(path)]) == 0
    assert "paper.row = " in capsys.readouterr().out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_matches_its_row(path):
    cfg = load_config(path)
    arch, ensemble, method, hyper, acc, sparsity = ROWS[cfg.paper.row]
    m, t, p = cfg.model, cfg.train, cfg.prune
    # the net: plain ResNets have no noise in the reference code, En_n members 0.1; raw [0, 1] input
    assert (m.arch, m.ensemble, m.noise_coef, m.normalize) == (arch, ensemble, 0.0 if ensemble == 1 else 0.1, False)
    # PGD-10 adversarial training, 200 epochs, lr 0.1 /10 at 80/120/160, SGD Nesterov re-created every epoch
    assert (t.epochs, t.batch_size, t.lr, t.lr_milestones, t.lr_gamma) == (200, 128, 0.1, (0.4, 0.6, 0.8), 0.1)
    assert (t.momentum, t.nesterov, t.weight_decay, t.reset_optimizer) == (0.9, True, 5e-4, "epoch")
    a = t.attack
    assert (a.kind, a.eps_255, a.step_255, a.steps, a.random_start) == ("pgd", 8, 2, 10, True)
    assert p.method == method
    if method != "none":   # pruning jointly with adversarial training from initialisation, same schedule
        assert (p.init, p.epochs, p.lr, p.lr_milestones) == ("scratch", 200, 0.1, (0.4, 0.6, 0.8))
    s = p.settings
    if method == "rgsm":
        assert (s.beta, s.lambda1, s.lambda2, s.prox, p.groups) == (1.0, hyper["lambda1"], 1e-5, "hard", "paper")
    elif method == "rvsm":
        assert (s.beta, s.lam, s.penalty) == (hyper["beta"], 1e-6, "l0")
    elif method == "admm":
        assert (s.sparsity, s.rho) == (hyper["sparsity"], 1e-2)
    # the paper's attack constants for A1-A4 and its numbers
    e = cfg.eval
    assert (e.paper_eps_01, e.paper_step_01, e.ifgsm_steps, e.cw_steps, e.cw_lr, e.cw_c) == (0.031, 0.007, 20, 50, 6e-4, 10)
    assert (cfg.paper.a1_natural, cfg.paper.a2_fgsm, cfg.paper.a3_ifgsm20, cfg.paper.a4_cw) == acc
    assert {k: getattr(cfg.paper, k) for k in ("channel_sparsity", "weight_sparsity")
            if getattr(cfg.paper, k) is not None} == sparsity
