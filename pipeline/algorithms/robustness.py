"""Robust accuracy of one model under a list of attacks, and the orderings every honest result satisfies.

No file I/O: the eval stage calls this and records the numbers. An image counts as robust to an attack when the
model classifies the clean image *and* the attack's example correctly (the AutoAttack convention), so attacks
only run on the images the model gets right, and a stochastic model's luck on a fresh pass cannot turn a
misclassified image into a robust one."""
from __future__ import annotations

import dataclasses
import math
import time
import zlib

import torch

from . import attacks as A

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


def craft(model, run, images, labels, attack_on: torch.Tensor, *, batch_size: int, seed: int) -> torch.Tensor:
    """Adversarial examples by ``run(model, x, y, generator)`` for the images in ``attack_on`` (the rest stay
    clean). Each image draws its random starts from a stream of its own (``ImageStreams``: ``seed`` and its index),
    so its example does not depend on which other images are attacked with it."""
    x_adv = images.clone()
    idx = attack_on.nonzero().squeeze(1)
    for i in range(0, len(idx), batch_size):
        sel = idx[i:i + batch_size]
        x_adv[sel] = run(model, images[sel], labels[sel], A.ImageStreams(seed, sel))
    return x_adv


def _correct_on(model, x, labels, on: torch.Tensor, *, batch_size: int, passes: int = 1) -> torch.Tensor:
    """``correct_mask`` computed on the images of ``on`` only (False elsewhere)."""
    out = torch.zeros(len(labels), dtype=torch.bool)
    idx = on.nonzero().squeeze(1)
    if len(idx):
        out[idx] = correct_mask(model, x[idx], labels[idx], batch_size=batch_size, passes=passes)
    return out


def pct(mask: torch.Tensor) -> float:
    return 100.0 * float(mask.float().mean()) if len(mask) else 0.0


def attack_seed(seed: int, name: str) -> int:
    """The random-start streams of one attack: the same for an image whichever images share its batch or mode."""
    return seed * 7919 + zlib.crc32(name.encode()) % 1_000_003


def evaluate_model(model, images, labels, specs: dict, *, stochastic: bool, batch_size: int,
                   avg_passes: int, sweep_eps_255, sweep_steps: int, seed: int, log=print,
                   keep_examples=(), cascade: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """Accuracies (%) of one model in one noise mode; returns (metrics, {attack: x_adv} for ``keep_examples``).
    ``specs``: name -> an attack spec (``name, key, run(model, x, y, generator), eps, stochastic_only, params``;
    pipeline/catalog/attacks.py builds them from the config), run in the given order.

    ``cascade`` (AutoAttack's convention): an attack receives only the images every earlier attack failed to break,
    and its accuracy is "robust after this attack and all before"; the worst case is the full mode's, image for
    image, on a deterministic model (random starts are per image). Its kept examples are one set, ``worst_case``:
    per image the first example that broke it, else the last attack's."""
    model.eval()
    torch.manual_seed(seed)   # the model's test-time noise
    n = len(images)
    natural = correct_mask(model, images, labels, batch_size=batch_size)
    out = {"images": n, "natural": pct(natural), "mode": "cascade" if cascade else "full"}
    if stochastic:
        again = correct_mask(model, images, labels, batch_size=batch_size)
        # how often a second noise draw changes the verdict: the yardstick for comparing stochastic numbers
        out["noise_flip_rate"] = pct(natural != again)
        out[f"natural_avg{avg_passes}"] = pct(correct_mask(model, images, labels, batch_size=batch_size,
                                                           passes=avg_passes))
    attacks, worst, kept = {}, natural.clone(), {}
    x_worst = images.clone()
    for name, spec in specs.items():
        if spec.stochastic_only and not stochastic:
            continue
        attack_on = worst if cascade else natural
        t0 = time.perf_counter()
        first = {}
        if name == "pgd" and not cascade:   # also record single-start PGD, the fair comparison for EOT-PGD
            def keep_first(r, xa):
                if r == 0:
                    first.setdefault("x", []).append(xa)
            spec = dataclasses.replace(spec, run=lambda m, x, y, g, _p=spec.params: A.pgd_restarts(
                m, x, y, generator=g, on_restart=keep_first, **_p))
        x_adv = craft(model, spec.run, images, labels, attack_on, batch_size=batch_size,
                      seed=attack_seed(seed, name))
        seconds = time.perf_counter() - t0
        robust = _correct_on(model, x_adv, labels, attack_on, batch_size=batch_size)
        broken = attack_on & ~robust
        x_worst[broken] = x_adv[broken]
        worst &= robust
        attacked = int(attack_on.sum())
        row = {"key": spec.key, "params": spec.params, "accuracy": pct(worst if cascade else robust),
               "attacked": attacked, "seconds": round(seconds, 2),
               "images_per_s": round(attacked / max(seconds, 1e-9), 1)}
        if stochastic:
            row[f"accuracy_avg{avg_passes}"] = pct(_correct_on(model, x_adv, labels, attack_on, batch_size=batch_size,
                                                               passes=avg_passes))
        if first:
            x_first = images.clone()
            x_first[attack_on.nonzero().squeeze(1)] = torch.cat(first["x"])
            row["accuracy_first_restart"] = pct(_correct_on(model, x_first, labels, attack_on,
                                                            batch_size=batch_size))
        attacks[name] = row
        if name in keep_examples and not cascade:
            kept[name] = x_adv
        log(f"{name}: {row['accuracy']:.2f}% ({spec.key}) on {attacked} images in {seconds:.1f}s, "
            f"{row['images_per_s']} img/s")
    out["attacks"] = attacks
    if attacks:
        out["worst_case"] = pct(worst)
        if cascade and keep_examples:
            last = x_adv
            x_worst[worst] = last[worst]
            kept["worst_case"] = x_worst
    sweep = []
    for e255 in sweep_eps_255:
        eps = e255 / 255
        run = lambda m, x, y, g, _e=eps: A.pgd(m, x, y, eps=_e, step=_e / 4 if _e else 0.0,  # noqa: E731
                                               steps=sweep_steps, generator=g)
        x_adv = craft(model, run, images, labels, natural, batch_size=batch_size, seed=attack_seed(seed, f"sweep{e255}"))
        sweep.append({"eps_255": e255, "accuracy": pct(_correct_on(model, x_adv, labels, natural,
                                                                    batch_size=batch_size))})
    out["sweep"] = sweep
    return out, kept


def sanity_checks(res: dict, *, stochastic: bool, slack_pt: float, paper_eps: float, strong_eps: float,
                  strong: tuple[str, ...]) -> list[dict]:
    """The orderings of §3 of issue 8: eps 0 = natural; accuracy non-increasing in eps; strong <= IFGSM <= FGSM;
    EOT <= single-sample; every attack <= natural. ``strong``: the attacks checked not to beat IFGSM. eps 0 must
    equal natural exactly on a deterministic model. The orderings between attacks are what a working attack shows,
    not theorems, so they get ``slack_pt``; on a stochastic model the larger of that and 3 standard errors of the
    measured noise flip rate.

    A cascade's columns are cumulative (each <= the one before by construction), so the orderings between
    attacks say nothing there; instead its worst case must not beat the eps sweep's PGD at the strong radius,
    which ran on every image on its own."""
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
    if res.get("mode") == "cascade":
        at_eps = [x for x in sweep if abs(x["eps_255"] / 255 - strong_eps) < 1e-9]
        if at_eps and "worst_case" in res:
            check("cascade_worst_not_above_sweep_pgd", "cascade worst case", res["worst_case"],
                  f"PGD-sweep at eps {at_eps[0]['eps_255']:g}/255", at_eps[0]["accuracy"])
        return checks
    if "ifgsm" in acc and "fgsm" in acc:
        check("ifgsm_not_above_fgsm", "ifgsm", acc["ifgsm"], "fgsm", acc["fgsm"])
    if "ifgsm" in acc and strong_eps >= paper_eps:
        for k in strong:
            if k in acc:
                check(f"{k}_not_above_ifgsm", k, acc[k], "ifgsm", acc["ifgsm"])
    if "eot_pgd" in acc and "accuracy_first_restart" in res["attacks"].get("pgd", {}):
        check("eot_not_above_single_sample", "eot_pgd", acc["eot_pgd"], "pgd (one start, one sample)",
              res["attacks"]["pgd"]["accuracy_first_restart"])
    return checks
