"""Robust accuracy of one model under a list of attacks, and the orderings every honest result satisfies.

No file I/O: the eval stage calls this and records the numbers. An image counts as robust to an attack when the
model classifies the clean image *and* the attack's example correctly (the AutoAttack convention), so attacks
only run on the images the model gets right, and a stochastic model's luck on a fresh pass cannot turn a
misclassified image into a robust one."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .algorithms import attacks as A

PAPER = ("fgsm", "ifgsm", "cw_paper")
STRONG = ("pgd", "eot_pgd", "apgd_ce", "apgd_dlr")
ATTACKS = PAPER + STRONG


@dataclass(frozen=True)
class AttackSpec:
    name: str
    key: str                       # the name with its parameters, as report.json records it
    run: Callable                  # (model, x, y, generator) -> x_adv
    eps: float
    stochastic_only: bool = False  # EOT is meaningless for a deterministic model
    params: dict = field(default_factory=dict)


def _key(name: str, params: dict) -> str:
    def fmt(v):
        return f"{v:g}" if isinstance(v, float) else str(v)
    return f"{name}[" + ",".join(f"{k}={fmt(v)}" for k, v in params.items()) + "]"


def attack_specs(e) -> dict[str, AttackSpec]:
    """The attacks named in ``e.attacks`` (an EvalConfig), with their explicit hyper-parameters."""
    eps, step = e.eps_255 / 255, e.step_255 / 255
    table = {
        "fgsm": (dict(eps=e.paper_eps_01),
                 lambda p: lambda m, x, y, g: A.fgsm(m, x, y, **p), False),
        "ifgsm": (dict(eps=e.paper_eps_01, step=e.paper_step_01, steps=e.ifgsm_steps),
                  lambda p: lambda m, x, y, g: A.ifgsm(m, x, y, **p), False),
        "cw_paper": (dict(eps=e.paper_eps_01, c=e.cw_c, kappa=e.cw_kappa, lr=e.cw_lr, steps=e.cw_steps),
                     lambda p: lambda m, x, y, g: A.cw_paper(m, x, y, **p), False),
        "pgd": (dict(eps=eps, step=step, steps=e.pgd_steps, restarts=e.pgd_restarts),
                lambda p: lambda m, x, y, g: A.pgd_restarts(m, x, y, generator=g, **p), False),
        "eot_pgd": (dict(eps=eps, step=step, steps=e.pgd_steps, eot_samples=e.eot_samples),
                    lambda p: lambda m, x, y, g: A.pgd(m, x, y, generator=g, **p), True),
        "apgd_ce": (dict(eps=eps, steps=e.apgd_steps, loss="ce"),
                    lambda p: lambda m, x, y, g: A.apgd(m, x, y, generator=g, **p), False),
        "apgd_dlr": (dict(eps=eps, steps=e.apgd_steps, loss="dlr"),
                     lambda p: lambda m, x, y, g: A.apgd(m, x, y, generator=g, **p), False),
    }
    out = {}
    for name in e.attacks:
        params, make, stochastic_only = table[name]
        shown = {k: v for k, v in params.items() if k != "loss"}
        out[name] = AttackSpec(name, _key(name, shown), make(params), params["eps"], stochastic_only, shown)
    return out


def _batched(images: torch.Tensor, labels: torch.Tensor, batch_size: int):
    for i in range(0, len(images), batch_size):
        yield slice(i, i + batch_size), images[i:i + batch_size], labels[i:i + batch_size]


@torch.no_grad()
def correct_mask(model, images, labels, *, batch_size: int, passes: int = 1) -> torch.Tensor:
    """Per image: is the prediction right? With ``passes`` > 1 the prediction is the mean softmax over that many
    stochastic passes (an averaged classifier, as a deployment could run it)."""
    out = torch.zeros(len(images), dtype=torch.bool)
    for sl, x, y in _batched(images, labels, batch_size):
        probs = sum(torch.softmax(model(x), 1) for _ in range(passes))
        out[sl] = (probs.argmax(1) == y).cpu()
    return out


def craft(model, spec: AttackSpec, images, labels, attack_on: torch.Tensor, *, batch_size: int,
          generator: torch.Generator) -> torch.Tensor:
    """Adversarial examples for the images in ``attack_on`` (the rest stay clean)."""
    x_adv = images.clone()
    idx = attack_on.nonzero().squeeze(1)
    for i in range(0, len(idx), batch_size):
        sel = idx[i:i + batch_size]
        x_adv[sel] = spec.run(model, images[sel], labels[sel], generator)
    return x_adv


def pct(mask: torch.Tensor) -> float:
    return 100.0 * float(mask.float().mean()) if len(mask) else 0.0


def evaluate_model(model, images, labels, specs: dict[str, AttackSpec], *, stochastic: bool, batch_size: int,
                   avg_passes: int, sweep_eps_255, sweep_steps: int, seed: int, log=print,
                   keep_examples=()) -> tuple[dict, dict[str, torch.Tensor]]:
    """Accuracies (%) of one model in one noise mode; returns (metrics, {attack: x_adv} for ``keep_examples``)."""
    model.eval()
    torch.manual_seed(seed)   # the model's test-time noise
    generator = torch.Generator().manual_seed(seed)
    n = len(images)
    natural = correct_mask(model, images, labels, batch_size=batch_size)
    out = {"images": n, "natural": pct(natural)}
    if stochastic:
        again = correct_mask(model, images, labels, batch_size=batch_size)
        # how often a second noise draw changes the verdict: the yardstick for comparing stochastic numbers
        out["noise_flip_rate"] = pct(natural != again)
        out[f"natural_avg{avg_passes}"] = pct(correct_mask(model, images, labels, batch_size=batch_size,
                                                           passes=avg_passes))
    attacks, worst, kept = {}, natural.clone(), {}
    for name, spec in specs.items():
        if spec.stochastic_only and not stochastic:
            continue
        t0 = time.perf_counter()
        first = {}
        if name == "pgd":   # also record single-start PGD, the fair comparison for EOT-PGD
            def keep_first(r, xa):
                if r == 0:
                    first.setdefault("x", []).append(xa)
            spec = AttackSpec(spec.name, spec.key, lambda m, x, y, g, _p=spec.params: A.pgd_restarts(
                m, x, y, generator=g, on_restart=keep_first, **_p), spec.eps, spec.stochastic_only, spec.params)
        x_adv = craft(model, spec, images, labels, natural, batch_size=batch_size, generator=generator)
        seconds = time.perf_counter() - t0
        robust = natural & correct_mask(model, x_adv, labels, batch_size=batch_size)
        worst &= robust
        row = {"key": spec.key, "params": spec.params, "accuracy": pct(robust), "seconds": round(seconds, 2),
               "images_per_s": round(int(natural.sum()) / max(seconds, 1e-9), 1)}
        if stochastic:
            row[f"accuracy_avg{avg_passes}"] = pct(natural & correct_mask(model, x_adv, labels,
                                                                         batch_size=batch_size, passes=avg_passes))
        if first:
            x_first = images.clone()
            x_first[natural.nonzero().squeeze(1)] = torch.cat(first["x"])
            row["accuracy_first_restart"] = pct(natural & correct_mask(model, x_first, labels,
                                                                       batch_size=batch_size))
        attacks[name] = row
        if name in keep_examples:
            kept[name] = x_adv
        log(f"{name}: {row['accuracy']:.2f}% ({spec.key}) in {seconds:.1f}s, {row['images_per_s']} img/s")
    out["attacks"] = attacks
    if attacks:
        out["worst_case"] = pct(worst)
    sweep = []
    for e255 in sweep_eps_255:
        eps = e255 / 255
        spec = AttackSpec("sweep", "", lambda m, x, y, g, _e=eps: A.pgd(m, x, y, eps=_e, step=_e / 4 if _e else 0.0,
                                                                         steps=sweep_steps, generator=g), eps)
        x_adv = craft(model, spec, images, labels, natural, batch_size=batch_size, generator=generator)
        sweep.append({"eps_255": e255, "accuracy": pct(natural & correct_mask(model, x_adv, labels,
                                                                               batch_size=batch_size))})
    out["sweep"] = sweep
    return out, kept


def sanity_checks(res: dict, *, stochastic: bool, slack_pt: float, paper_eps: float, strong_eps: float) -> list[dict]:
    """The orderings of §3 of issue 8: eps 0 = natural; accuracy non-increasing in eps; strong <= IFGSM <= FGSM;
    EOT <= single-sample; every attack <= natural. eps 0 must equal natural exactly on a deterministic model.
    The orderings between attacks are what a working attack shows, not theorems, so they get ``slack_pt``;
    on a stochastic model the larger of that and 3 standard errors of the measured noise flip rate."""
    n = max(res["images"], 1)
    slack = slack_pt
    if stochastic:
        flip = res.get("noise_flip_rate", 0.0) / 100
        slack = max(slack_pt, 300.0 * math.sqrt(2 * flip / n))
    checks = []

    def check(name, lhs_name, lhs, rhs_name, rhs):
        checks.append({"check": name, "ok": bool(lhs <= rhs + slack),
                       "detail": f"{lhs_name} {lhs:.2f}% <= {rhs_name} {rhs:.2f}% (+{slack:.2f} slack)"})

    sweep = res["sweep"]
    if sweep and sweep[0]["eps_255"] == 0:
        s0 = sweep[0]["accuracy"]
        tol = slack if stochastic else 1e-9
        checks.append({"check": "eps0_equals_natural", "ok": bool(abs(s0 - res["natural"]) <= tol),
                       "detail": f"PGD at eps 0: {s0:.2f}% vs natural {res['natural']:.2f}%"})
    for a, b in zip(sweep, sweep[1:]):
        check(f"sweep_eps{b['eps_255']:g}_not_above_eps{a['eps_255']:g}", f"eps {b['eps_255']:g}/255",
              b["accuracy"], f"eps {a['eps_255']:g}/255", a["accuracy"])
    acc = {k: v["accuracy"] for k, v in res["attacks"].items()}
    for k, v in acc.items():
        check(f"{k}_not_above_natural", k, v, "natural", res["natural"])
    if "ifgsm" in acc and "fgsm" in acc:
        check("ifgsm_not_above_fgsm", "ifgsm", acc["ifgsm"], "fgsm", acc["fgsm"])
    if "ifgsm" in acc and strong_eps >= paper_eps:
        for k in STRONG:
            if k in acc:
                check(f"{k}_not_above_ifgsm", k, acc[k], "ifgsm", acc["ifgsm"])
    if "eot_pgd" in acc and "accuracy_first_restart" in res["attacks"].get("pgd", {}):
        check("eot_not_above_single_sample", "eot_pgd", acc["eot_pgd"], "pgd (one start, one sample)",
              res["attacks"]["pgd"]["accuracy_first_restart"])
    return checks
