"""L-inf attacks on models that take images in [0, 1].

``eot_samples`` > 1 averages the input gradient over that many forward passes (Expectation over
Transformation), which is what attacking a model with test-time noise requires.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _input_grad(model, x: torch.Tensor, y: torch.Tensor, eot_samples: int) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    loss = 0.0
    for _ in range(eot_samples):
        loss = loss + F.cross_entropy(model(x), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def _random_start(x: torch.Tensor, eps: float, generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device) * 2 - 1
    return (x + eps * noise).clamp(0, 1)


def pgd(model, x: torch.Tensor, y: torch.Tensor, *, eps: float, step: float, steps: int,
        random_start: bool = True, eot_samples: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient ascent on the cross-entropy inside the eps-ball around ``x`` and [0, 1].

    The model's train/eval mode is left as the caller set it.
    """
    if eps == 0 or steps == 0:
        return x.detach().clone()
    x = x.detach()
    x_adv = _random_start(x, eps, generator) if random_start else x.clone()
    for _ in range(steps):
        grad = _input_grad(model, x_adv, y, eot_samples)
        x_adv = x_adv.detach() + step * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def fgsm_rs(model, x: torch.Tensor, y: torch.Tensor, *, eps: float, step: float | None = None,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """FGSM from a uniform random start (Wong et al., 2020), step 1.25·eps by default: a cheap training attack."""
    step = 1.25 * eps if step is None else step
    return pgd(model, x, y, eps=eps, step=step, steps=1, random_start=True, generator=generator)


def make_attack(kind: str, *, eps: float, step: float, steps: int, random_start: bool = True,
                eot_samples: int = 1):
    """A callable ``(model, x, y, generator) -> x_adv`` (or None for natural training)."""
    if kind not in ("none", "pgd", "fgsm_rs"):
        raise ValueError(f"unknown attack kind {kind!r}")
    if kind == "none" or eps == 0:
        return None
    if kind == "pgd":
        return lambda model, x, y, generator=None: pgd(model, x, y, eps=eps, step=step, steps=steps,
                                                       random_start=random_start, eot_samples=eot_samples,
                                                       generator=generator)
    # fgsm_rs takes its own step (1.25*eps, Wong et al. 2020); `step` is the PGD step size.
    return lambda model, x, y, generator=None: fgsm_rs(model, x, y, eps=eps, generator=generator)
