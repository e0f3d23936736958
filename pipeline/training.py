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
                augment: bool, device, sparsifier=None, progress: str | None = None, precision: str = "fp32",
                channels_last: bool = False, world=None, attack_generator: torch.Generator | None = None) -> dict:
    """One epoch of (adversarial) training. A ``sparsifier`` (RGSM, RVSM, ADMM) gets ``before_batch()``,
    ``regularize()`` after backward and ``pull(lr)`` after the optimizer step; the caller ends its epoch.

    ``precision = "bf16"`` runs the attack and the forward pass under bf16 autocast (weights, gradients and the
    optimizer stay fp32); ``channels_last`` feeds NHWC batches (the model must be converted by the caller).
    Loss and accuracy accumulate on the device: on a GPU the loop never waits for the host, and a non-finite
    loss is reported at the end of the epoch (naming its first batch) instead of at once.

    ``world`` (pipeline/distributed.py; ``model`` then is the DDP wrapper): every rank draws the same global batch
    and trains on its slice; the attack runs on the unwrapped model with ``attack_generator`` (per rank), and the
    returned loss/accuracy/throughput are over all ranks."""
    from .distributed import shard, unwrap
    from tqdm import tqdm

    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    device = torch.device(device)
    model.train()
    lr = optimizer.param_groups[0]["lr"]
    seen = 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    first_bad = torch.zeros((), dtype=torch.int64, device=device)   # 1-based index of the first non-finite loss
    check_now = device.type != "cuda"   # on the CPU a check costs nothing: stop at the bad batch itself
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext
    start = time.perf_counter()
    n_batches = (len(split) + batch_size - 1) // batch_size
    it = batches(split, batch_size, shuffle=True, generator=generator, augment_images=augment, device=device)
    bar = tqdm(it, total=n_batches, desc=progress, leave=False, disable=None if progress else True, mininterval=2)

    def diverged(index, value):
        return TrainingDiverged(f"{progress or 'training'}: the loss became {value} at batch {index}/{n_batches} "
                                f"(lr = {lr}); lower the learning rate")

    for batch_index, (x, y) in enumerate(bar, start=1):
        if world is not None:
            if len(y) < world.size:
                continue   # a slice per rank would be empty
            x, y = shard(x, world), shard(y, world)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if sparsifier is not None:
            sparsifier.before_batch()
        with autocast():
            if attack is not None:
                # the unwrapped model: crafting needs no gradient sync, and the weights are equal on every rank
                x = attack(unwrap(model), x, y, attack_generator or generator)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        finite = torch.isfinite(loss.detach())
        if check_now and not bool(finite):
            raise diverged(batch_index, float(loss.detach()))
        first_bad = torch.where((first_bad == 0) & ~finite, batch_index, first_bad)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sparsifier is not None:
            sparsifier.regularize()
        optimizer.step()
        if sparsifier is not None:
            sparsifier.pull(lr)
        seen += len(y)
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
    if int(first_bad):
        raise diverged(int(first_bad), "non-finite")
    if world is not None:
        import torch.distributed as dist

        totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), dtype=torch.float64,
                                                                       device=device)])
        dist.all_reduce(totals)
        loss_sum, correct, seen = totals[0], totals[1], int(totals[2])
    seconds = time.perf_counter() - start
    return {"loss": float(loss_sum) / max(seen, 1), "train_acc": 100.0 * int(correct) / max(seen, 1),
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
