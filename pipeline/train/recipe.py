"""The adversarial-training recipe every training stage shares -- the optimizer, the training and validation
attacks, validation -- and ``fit``, the one epoch loop (schedule, sparsifier epoch ends, validation, logging,
resumable checkpoints) that the train and prune stages run."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

import torch

from ..algorithms.attacks import make_attack
from ..core.files import atomic_write_text
from . import resume
from . import distributed
from .loop import evaluate, set_lr, snapshot, step_lr, train_epoch


def training_attack(cfg):
    a = cfg.train.attack
    return make_attack(a.kind, eps=a.eps_255 / 255, step=a.step_255 / 255, steps=a.steps,
                       random_start=a.random_start)


def validation_attack(cfg):
    a = cfg.train.attack
    return make_attack("pgd", eps=a.eps_255 / 255, step=a.step_255 / 255, steps=cfg.train.val_attack_steps)


def make_optimizer(model, cfg, lr: float):
    t = cfg.train
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=t.momentum, nesterov=t.nesterov,
                           weight_decay=t.weight_decay)


def epoch_optimizer(optimizer, model, cfg, lr: float):
    """The optimizer for the next epoch: the same one, or (train.reset_optimizer = "epoch") a fresh SGD whose
    momentum starts from zero, as the reference code re-creates it every epoch."""
    if optimizer is None or cfg.train.reset_optimizer == "epoch":
        return make_optimizer(model, cfg, lr)
    return optimizer


def validate(model, val, cfg, device, generator) -> dict:
    bs = cfg.train.val_batch_size
    out = {"val_natural": evaluate(model, val, batch_size=bs, device=device)}
    attack = validation_attack(cfg)
    if attack is not None:
        out["val_robust"] = evaluate(model, val, batch_size=bs, device=device, attack=attack, generator=generator)
    return out


@dataclass(frozen=True)
class Schedule:
    """Epochs and the step-decay learning rate of one training stage (train.* or prune.*)."""
    epochs: int
    lr: float
    milestones: tuple[float, ...]
    gamma: float
    warmup_epochs: int = 0

    def lr_at(self, epoch: int) -> float:
        return step_lr(epoch, base_lr=self.lr, epochs=self.epochs, milestones=self.milestones, gamma=self.gamma,
                       warmup_epochs=self.warmup_epochs)


@dataclass
class Fitted:
    log_lines: list[str]       # one JSON line of stats per epoch
    best: dict | None          # the stats of the epoch selected on ``select_on`` (None without selection)
    best_state: dict | None    # its weights


def fit(ctx, model, trained, *, name: str, schedule: Schedule, seed: int, generator: torch.Generator, train, val,
        device, world, sparsifier=None, state: dict | None = None, select_on: str | None = None,
        before_projection=None, epoch_stats=None, loss_weights: tuple[float, float] = (0.0, 1.0),
        validation_context=None) -> Fitted:
    """Adversarial training of ``model`` (``trained``: itself, or its DDP wrapper) for ``schedule``.

    Every epoch: the optimizer (kept, or fresh with train.reset_optimizer = "epoch"), the learning rate, one epoch
    of ``train_epoch`` (with the sparsifier's steps), the sparsifier's epoch end (``before_projection(last)`` is
    called just before it), the ranks' sync, validation, ``epoch_stats()`` merged into the log line, selection of
    the best epoch on ``select_on``, and a resumable checkpoint (train.checkpoint_every). ``loss_weights``: (natural,
    adversarial) weights of the loss; ``validation_context()``: entered around validation (Binary-Relax validates
    the quantized weights, what ships). ``state``: the stage's
    last checkpoint, whose weights the caller has loaded (before building the sparsifier, whose state may
    derive from them); ``seed``: the stage's own, for per-rank attack streams under torchrun."""
    cfg, t = ctx.cfg, ctx.cfg.train
    optimizer = None
    attack = training_attack(cfg)
    best, best_state, log_lines, start = None, None, [], 0
    if state is not None:
        if sparsifier is not None:
            sparsifier.load_state_dict(state["sparsifier"])
        optimizer = make_optimizer(model, cfg, schedule.lr)
        optimizer.load_state_dict(state["optimizer"])
        best, best_state, log_lines, start = state["best"], state["best_state"], state["log_lines"], state["epoch"]
        resume.set_rng_state(state["rng"], generator)
        ctx.log(f"resuming after epoch {start}/{schedule.epochs} from the stage's last checkpoint")
    for epoch in range(start, schedule.epochs):
        optimizer = epoch_optimizer(optimizer, model, cfg, schedule.lr)
        set_lr(optimizer, schedule.lr_at(epoch))
        attack_generator = distributed.epoch_attack_generator(seed, epoch, world)
        stats = train_epoch(trained, train, optimizer, batch_size=t.batch_size, attack=attack, generator=generator,
                            augment=t.augment, device=device, sparsifier=sparsifier,
                            progress=f"{name} {epoch + 1}/{schedule.epochs}", precision=t.precision,
                            channels_last=t.channels_last, world=world, attack_generator=attack_generator,
                            cuda_graphs=t.cuda_graphs, loss_weights=loss_weights)
        if sparsifier is not None:
            last = epoch == schedule.epochs - 1
            if before_projection is not None:
                before_projection(last)
            sparsifier.end_epoch(last=last)
        distributed.end_epoch(model, world)   # after the projection: the check covers the sparsifier's steps too
        with validation_context() if validation_context is not None else contextlib.nullcontext():
            stats.update(validate(model, val, cfg, device, generator))
        if epoch_stats is not None:
            stats.update(epoch_stats())
        stats["epoch"] = epoch + 1
        log_lines.append(json.dumps(stats))
        ctx.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
        if select_on is not None and (best is None or stats[select_on] > best[select_on]):
            best, best_state = stats, snapshot(model)
        if resume.due(epoch + 1, schedule.epochs, t.checkpoint_every) and (world is None or world.is_main):
            resume.save(ctx.resume_dir, {"epoch": epoch + 1, "model": model.state_dict(),
                                         "optimizer": optimizer.state_dict(),
                                         "sparsifier": sparsifier.state_dict() if sparsifier is not None else None,
                                         "best": best, "best_state": best_state, "log_lines": log_lines,
                                         "rng": resume.rng_state(generator)})
    atomic_write_text(ctx.out_dir / "epochs.jsonl", "\n".join(log_lines) + "\n")
    return Fitted(log_lines, best, best_state)
