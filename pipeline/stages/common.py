"""What several stages share: data splits, device, seeding, model evaluation."""
from __future__ import annotations

import functools
import random

import torch

from ..config import RunConfig
from ..data import Split, load_cifar10, train_val_split


@functools.lru_cache(maxsize=2)
def _cifar(root: str, download: bool):
    return load_cifar10(root, download)


def data_splits(cfg: RunConfig) -> tuple[Split, Split, Split]:
    """(train, val, test) exactly as the config defines them; val is held out of the training set."""
    d = cfg.data
    train_full, test = _cifar(d.root, d.download)
    train, val = train_val_split(train_full, d.val_size, d.split_seed)
    train = train.subset(d.train_subset, d.split_seed + 1)
    test = test.subset(d.test_subset, d.split_seed + 2)
    return train, val, test


def device_of(cfg: RunConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device = 'cuda' but torch sees no CUDA device")
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def model_kwargs(cfg: RunConfig) -> dict:
    return {"ensemble": cfg.model.ensemble, "noise_coef": cfg.model.noise_coef}


def test_set_metrics(model, test: Split, cfg: RunConfig, device, generator: torch.Generator, log) -> dict:
    """Natural and PGD accuracy on the test set: with the model's noise as trained (the paper's numbers),
    with EOT when the model is stochastic, and with noise off (what the exported graph computes)."""
    from ..algorithms.attacks import pgd
    from ..training import evaluate

    e = cfg.eval
    eps, step = e.eps_255 / 255, e.step_255 / 255
    noisy = cfg.model.noise_coef > 0
    tag = f"pgd{e.pgd_steps}"

    def attack(eot=1):
        return lambda m, x, y, g=None: pgd(m, x, y, eps=eps, step=step, steps=e.pgd_steps, eot_samples=eot,
                                           generator=g)

    out = {"test_images": len(test)}
    out["natural"] = evaluate(model, test, batch_size=e.batch_size, device=device)
    out[tag] = evaluate(model, test, batch_size=e.batch_size, device=device, attack=attack(), generator=generator)
    if noisy and e.eot_samples > 1:
        out[f"{tag}_eot{e.eot_samples}"] = evaluate(model, test, batch_size=e.batch_size, device=device,
                                                   attack=attack(e.eot_samples), generator=generator)
    if noisy and e.noise_off_too:
        out["natural_noise_off"] = evaluate(model, test, batch_size=e.batch_size, device=device, noise=False)
        out[f"{tag}_noise_off"] = evaluate(model, test, batch_size=e.batch_size, device=device, attack=attack(),
                                           generator=generator, noise=False)
    out["sanity"] = attack_sanity(out, tag)
    log("test: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in out.items()
                             if k != "sanity"))
    if not all(out["sanity"].values()):
        log(f"WARNING: attack sanity check failed: {out['sanity']}")
    return out


def attack_sanity(acc: dict, tag: str) -> dict:
    """Orderings every honest robustness number must satisfy (a violation means a broken attack).

    A 1-point slack on the stochastic model's comparisons absorbs its test-time noise."""
    checks = {"attack_below_natural": acc[tag] <= acc["natural"] + 1.0}
    for k in acc:
        if k.startswith(f"{tag}_eot"):
            checks["eot_not_weaker"] = acc[k] <= acc[tag] + 1.0
    if "natural_noise_off" in acc:
        checks["attack_below_natural_noise_off"] = acc[f"{tag}_noise_off"] <= acc["natural_noise_off"]
    return checks
