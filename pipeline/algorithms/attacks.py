"""Attacks on classifiers that take images in [0, 1]; L-inf unless the name says otherwise.

Every attack is a pure function ``(model, x, y, *, hyper-parameters, generator) -> x_adv``: batched, no I/O, no
device choice. Its own randomness (random starts) comes from the explicit ``generator`` (on a GPU, ``None`` or a
CUDA generator draws on the device; ``ImageStreams``: one stream per image, so that an image's example does not
depend on its batch); a stochastic model's test-time noise draws from torch's global RNG, which
the caller seeds. The model's train/eval mode is left as the caller set it.

- The paper's columns exactly as its reference evaluation script ran them (``../shared/paper`` §2.3): ``fgsm``,
  ``ifgsm`` (no random start) and ``cw_paper`` (a deliberately weak C&W variant: see its docstring).
- Training attacks: ``pgd`` (random start) and ``fgsm_rs``.
- Strong attacks: ``pgd_restarts`` (worst case per image over random restarts), EOT through ``eot_samples``
  (the gradient averaged over that many forward passes, Athalye et al. 2018: what a model with random test-time
  noise must be attacked with), and ``apgd`` with the CE or DLR loss (Croce & Hein 2020, Algorithm 1).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020, eq. 6): -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3).

    Shift- and scale-invariant in the logits, so a model cannot hide behind large or flat logits."""
    z_sorted, _ = logits.sort(dim=1, descending=True)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    top_is_y = logits.argmax(1) == y
    z_other = torch.where(top_is_y, z_sorted[:, 1], z_sorted[:, 0])
    return -(z_y - z_other) / (z_sorted[:, 0] - z_sorted[:, 2] + 1e-12)


LOSSES = {"ce": ce_loss, "dlr": dlr_loss}


def _value_and_grad(model, x: torch.Tensor, y: torch.Tensor, loss: str, eot_samples: int):
    """Per-image loss and input gradient, both averaged over ``eot_samples`` forward passes, and the last pass's
    logits. Every attack's gradient goes through here (a test records every iterate from it)."""
    x = x.detach().requires_grad_(True)
    total, values = 0.0, 0.0
    for _ in range(eot_samples):
        logits = model(x)
        per_image = LOSSES[loss](logits, y)
        values = values + per_image.detach()
        total = total + per_image.sum()
    (grad,) = torch.autograd.grad(total, x)
    return values / eot_samples, grad / eot_samples, logits.detach()


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps) -> torch.Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)


class ImageStreams:
    """Random numbers per image: image ``ids[i]`` draws from its own stream (seeded by ``seed``, the image id and how
    many draws it made), so its random starts do not depend on which other images share its batch -- the condition
    for attacking only the survivors of earlier attacks (cascade evaluation) to give each image the same example as
    attacking all of them. Pass it wherever an attack takes a ``generator``."""

    def __init__(self, seed: int, ids: torch.Tensor, counts: torch.Tensor | None = None, parent=None, index=None):
        self.seed, self.ids = int(seed), ids.detach().cpu().long()
        self.counts = torch.zeros(len(self.ids), dtype=torch.long) if counts is None else counts
        self.parent, self.index = parent, index   # a subset's draws count in the batch it came from too

    def select(self, index: torch.Tensor) -> "ImageStreams":
        """The streams of a subset of the batch."""
        index = index.cpu()
        return ImageStreams(self.seed, self.ids[index], self.counts[index].clone(), self, index)

    def rand(self, shape, dtype=torch.float32) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        for i, (image, count) in enumerate(zip(self.ids.tolist(), self.counts.tolist())):
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + image) * 1_009 + count)
            out[i] = torch.rand(shape[1:], generator=g, dtype=dtype)
        self.counts += 1
        node = self
        while node.parent is not None:
            node.parent.counts[node.index] += 1
            node = node.parent
        return out


def _subset(generator, index: torch.Tensor):
    return generator.select(index) if isinstance(generator, ImageStreams) else generator


def uniform_like(x: torch.Tensor, generator) -> torch.Tensor:
    """U[0, 1) numbers shaped like ``x`` from an attack's ``generator`` (a torch generator, ``ImageStreams`` or
    None): what every attack's randomness should come from."""
    if isinstance(generator, ImageStreams):
        return generator.rand(x.shape).to(x.device, x.dtype)
    if x.is_cuda and (generator is None or generator.device.type == "cuda"):
        # drawn on the GPU: no host round trip, and capturable in a CUDA graph (default generator)
        return torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    # a CPU generator: the same draws whatever the device, as the CPU tests pin them
    return torch.rand(x.shape, generator=generator, device="cpu").to(x.device)


def _random_start(x: torch.Tensor, eps: float, generator) -> torch.Tensor:
    noise = uniform_like(x, generator) * 2 - 1
    return (x + eps * noise).clamp(0, 1)


def pgd(model, x: torch.Tensor, y: torch.Tensor, *, eps: float, step: float, steps: int,
        random_start: bool = True, eot_samples: int = 1, loss: str = "ce",
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected sign-gradient ascent on ``loss`` inside the eps-ball around ``x`` and [0, 1] (Madry et al. 2018)."""
    x = x.detach()
    if steps == 0:
        return x.clone()
    x_adv = _random_start(x, eps, generator) if random_start else x.clone()
    for _ in range(steps):
        _, grad, _ = _value_and_grad(model, x_adv, y, loss, eot_samples)
        x_adv = _project(x_adv.detach() + step * grad.sign(), x, eps)
    return x_adv.detach()


def fgsm(model, x: torch.Tensor, y: torch.Tensor, *, eps: float, generator=None) -> torch.Tensor:
    """One sign step of size eps from the clean image (Goodfellow et al. 2015; the paper's A2, eps = 0.031)."""
    return pgd(model, x, y, eps=eps, step=eps, steps=1, random_start=False)


def ifgsm(model, x: torch.Tensor, y: torch.Tensor, *, eps: float, step: float, steps: int,
          generator=None) -> torch.Tensor:
    """Iterative FGSM from the clean image, no random start (the paper's A3: eps 0.031, step 0.007, 20 steps)."""
    return pgd(model, x, y, eps=eps, step=step, steps=steps, random_start=False)


def fgsm_rs(model, x: torch.Tensor, y: torch.Tensor, *, eps: float, step: float | None = None,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """FGSM from a uniform random start (Wong et al., 2020), step 1.25·eps by default: a cheap training attack."""
    step = 1.25 * eps if step is None else step
    return pgd(model, x, y, eps=eps, step=step, steps=1, random_start=True, generator=generator)


def _fooled(model, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x_adv).argmax(1) != y


def pgd_restarts(model, x: torch.Tensor, y: torch.Tensor, *, eps: float, step: float, steps: int, restarts: int,
                 eot_samples: int = 1, loss: str = "ce", generator: torch.Generator | None = None,
                 on_restart=None) -> torch.Tensor:
    """PGD from ``restarts`` random starts, keeping per image the first example that fools the model (else the
    last one). A restart only attacks the images no earlier restart fooled. ``on_restart(r, x_adv)`` sees the
    worst case after each restart (after restart 0 that is plain single-start PGD)."""
    x, x_adv = x.detach(), x.detach().clone()
    standing = torch.ones(len(x), dtype=torch.bool, device=x.device)
    for r in range(restarts):
        idx = standing.nonzero().squeeze(1)
        if len(idx):
            x_r = pgd(model, x[idx], y[idx], eps=eps, step=step, steps=steps, random_start=True,
                      eot_samples=eot_samples, loss=loss, generator=_subset(generator, idx))
            x_adv[idx] = x_r
            standing[idx[_fooled(model, x_r, y[idx])]] = False
        if on_restart is not None:
            on_restart(r, x_adv.clone())
    return x_adv


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations w_j = ceil(p_j · steps) where APGD checks its step size: p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) (Croce & Hein 2020, §3.2)."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({min(steps, math.ceil(pj * steps - 1e-9)) for pj in p[1:]} - {0})


def apgd(model, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100, loss: str = "ce",
         rho: float = 0.75, momentum: float = 0.75, eot_samples: int = 1,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """Auto-PGD (Croce & Hein 2020, Algorithm 1), L-inf, written from the paper.

    Sign-gradient steps with momentum ``momentum`` (the first step has none) from a uniform random start;
    the step size starts at 2·eps and is halved per image at the checkpoints of ``apgd_checkpoints`` when
    (1) the loss rose in fewer than ``rho`` of the steps since the last checkpoint, or (2) the step size was not
    halved at the last checkpoint and the best loss has not improved since; a halving restarts that image
    from its best point. Returns per image the first iterate that fooled the model, else the best-loss point."""
    x = x.detach()
    n = len(x)
    shape = (n,) + (1,) * (x.dim() - 1)
    eta = torch.full(shape, 2.0 * eps, device=x.device, dtype=x.dtype)
    x_cur = _random_start(x, eps, generator)
    f_cur, grad, logits = _value_and_grad(model, x_cur, y, loss, eot_samples)
    x_max, f_max, g_max = x_cur.clone(), f_cur.clone(), grad.clone()
    fooled = logits.argmax(1) != y
    x_found = torch.where(fooled.view(shape), x_cur, x)
    x_prev = x_cur.clone()
    checkpoints = apgd_checkpoints(steps)
    last_check, increases = 0, torch.zeros(n, device=x.device)
    reduced_last = torch.ones(n, dtype=torch.bool, device=x.device)  # no "unchanged since" test at the first check
    f_max_last = f_max.clone()
    for i in range(steps):
        a = 1.0 if i == 0 else momentum
        z = _project(x_cur + eta * grad.sign(), x, eps)
        x_next = _project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev), x, eps)
        f_next, g_next, logits = _value_and_grad(model, x_next, y, loss, eot_samples)
        increases += (f_next > f_cur).float()
        newly = (logits.argmax(1) != y) & ~fooled
        x_found = torch.where(newly.view(shape), x_next, x_found)
        fooled |= newly
        better = f_next > f_max
        x_max = torch.where(better.view(shape), x_next, x_max)
        g_max = torch.where(better.view(shape), g_next, g_max)
        f_max = torch.where(better, f_next, f_max)
        x_prev, x_cur, f_cur, grad = x_cur, x_next, f_next, g_next
        if i + 1 in checkpoints:
            too_few_increases = increases < rho * (i + 1 - last_check)
            stalled = ~reduced_last & (f_max <= f_max_last)
            halve = too_few_increases | stalled
            eta = torch.where(halve.view(shape), eta / 2, eta)
            # restart halved images from their best point, without momentum from the abandoned path
            x_cur = torch.where(halve.view(shape), x_max, x_cur)
            x_prev = torch.where(halve.view(shape), x_max, x_prev)
            grad = torch.where(halve.view(shape), g_max, grad)
            f_cur = torch.where(halve, f_max, f_cur)
            reduced_last, f_max_last = halve, f_max.clone()
            last_check, increases = i + 1, torch.zeros_like(increases)
    return torch.where(fooled.view(shape), x_found, x_max).detach()


def cw_l2(model, x: torch.Tensor, *, labels: torch.Tensor | None = None, c: float = 10.0, kappa: float = 0.0,
          lr: float = 6e-4, steps: int = 50) -> torch.Tensor:
    """Untargeted Carlini-Wagner L2 with a fixed constant, as the paper's reference ran it: Adam on the image w,
    minimising ||w - x||² + c·max(z_label - z_other + kappa, 0), where ``labels`` defaults to the model's own
    predictions and z_other is the largest other logit. Keeps each image's w with the lowest objective.
    Unlike the reference, w is clamped to [0, 1] after every step, so each iterate is an image."""
    x = x.detach()
    if labels is None:
        with torch.no_grad():
            labels = model(x).argmax(1)
    w = x.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([w], lr=lr)
    best_w, best_obj = x.clone(), torch.full((len(x),), math.inf, device=x.device)
    for _ in range(steps):
        logits = model(w)
        top2 = logits.topk(2, dim=1).indices
        other = torch.where(top2[:, 0] == labels, top2[:, 1], top2[:, 0])
        margin = logits.gather(1, labels[:, None]).squeeze(1) - logits.gather(1, other[:, None]).squeeze(1)
        obj = ((w - x) ** 2).flatten(1).sum(1) + c * (margin + kappa).clamp(min=0)
        with torch.no_grad():
            better = obj < best_obj
            best_w[better], best_obj[better] = w[better], obj[better]
        optimizer.zero_grad(set_to_none=True)
        obj.sum().backward()
        optimizer.step()
        with torch.no_grad():
            w.clamp_(0, 1)
    return best_w.detach()


def cw_paper(model, x: torch.Tensor, y: torch.Tensor | None = None, *, eps: float = 0.031, c: float = 10.0,
             kappa: float = 0.0, lr: float = 6e-4, steps: int = 50, generator=None) -> torch.Tensor:
    """The paper's A4 "C&W" (reference ``attack.py``): ``cw_l2`` against the model's own predictions (``y`` is
    ignored, as there), then the perturbation is *rescaled*: x + eps·(w* - x). After 50 Adam steps of 6e-4 the
    perturbation is at most about 0.03, so the rescaled one is about 0.001 per pixel: a weak attack (which is why
    A4 > A2 in every table); report it only as this variant. Clamped to [0, 1] (the reference does not clamp)."""
    w = cw_l2(model, x, c=c, kappa=kappa, lr=lr, steps=steps)
    return (x.detach() + eps * (w - x.detach())).clamp(0, 1)


def make_attack(kind: str, *, eps: float, step: float, steps: int, random_start: bool = True,
                eot_samples: int = 1):
    """A training/validation attack ``(model, x, y, generator) -> x_adv``, or None for natural training."""
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
