"""The training/evaluation loops shared by the train and prune stages (no file I/O here)."""
from __future__ import annotations

import contextlib
import copy
import time

import torch
import torch.nn.functional as F

from models import noise_disabled

from .data import Split, batches
from .errors import TrainingDiverged


def step_lr(epoch: int, *, base_lr: float, epochs: int, milestones: tuple[float, ...], gamma: float) -> float:
    """Step decay at fractions of the run, e.g. (0.4, 0.6, 0.8) of 200 epochs = the paper's 80/120/160.

    A milestone never falls on epoch 0: a short run starts at ``base_lr`` however the fractions round."""
    passed = sum(epoch >= max(1, round(m * epochs)) for m in milestones)
    return base_lr * gamma ** passed


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def train_epoch(model, split: Split, optimizer, *, batch_size: int, attack, generator: torch.Generator,
                augment: bool, device, sparsifier=None, progress: str | None = None) -> dict:
    """One epoch of (adversarial) training. A ``sparsifier`` (RGSM, RVSM, ADMM) gets ``before_batch()``,
    ``regularize()`` after backward and ``pull(lr)`` after the optimizer step; the caller ends its epoch."""
    from tqdm import tqdm

    model.train()
    lr = optimizer.param_groups[0]["lr"]
    seen = correct = 0
    loss_sum = 0.0
    start = time.perf_counter()
    n_batches = (len(split) + batch_size - 1) // batch_size
    it = batches(split, batch_size, shuffle=True, generator=generator, augment_images=augment, device=device)
    bar = tqdm(it, total=n_batches, desc=progress, leave=False, disable=None if progress else True, mininterval=2)
    for batch_index, (x, y) in enumerate(bar, start=1):
        if sparsifier is not None:
            sparsifier.before_batch()
        if attack is not None:
            x = attack(model, x, y, generator)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"{progress or 'training'}: the loss became {float(loss.detach())} at batch "
                                   f"{batch_index}/{n_batches} (lr = {lr}); lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sparsifier is not None:
            sparsifier.regularize()
        optimizer.step()
        if sparsifier is not None:
            sparsifier.pull(lr)
        seen += len(y)
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
    seconds = time.perf_counter() - start
    return {"loss": loss_sum / max(seen, 1), "train_acc": 100.0 * correct / max(seen, 1),
            "images_per_s": seen / seconds, "seconds": seconds, "lr": lr}


def evaluate(model, split: Split, *, batch_size: int, device, attack=None,
             generator: torch.Generator | None = None, noise: bool = True) -> float:
    """Accuracy (%) in eval mode, on adversarial examples when ``attack`` is given."""
    model.eval()
    correct = 0
    ctx = noise_disabled(model) if not noise else contextlib.nullcontext()
    with ctx:
        for x, y in batches(split, batch_size, shuffle=False, device=device):
            if attack is not None:
                x = attack(model, x, y, generator)
            with torch.no_grad():
                correct += int((model(x).argmax(1) == y).sum())
    return 100.0 * correct / max(len(split), 1)


def snapshot(model) -> dict:
    return copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
