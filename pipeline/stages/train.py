"""Stage ``train``: PGD adversarial training; the checkpoint is selected on validation robust accuracy."""
from __future__ import annotations

import json

import torch

from models import create_model, describe

from ..algorithms.attacks import make_attack
from .. import distributed, resume
from ..algorithms.sparsity import PAPER_ZERO_TOL, sparsity_metrics
from ..runio import save_model
from ..runner import Stage, StageContext, StageResult
from ..training import evaluate, set_lr, snapshot, step_lr, train_epoch
from .common import data_splits, device_of, model_kwargs, seed_everything


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


def validate(model, val, cfg, device, generator) -> dict:
    bs = cfg.train.val_batch_size
    out = {"val_natural": evaluate(model, val, batch_size=bs, device=device)}
    attack = validation_attack(cfg)
    if attack is not None:
        out["val_robust"] = evaluate(model, val, batch_size=bs, device=device, attack=attack, generator=generator)
    return out


def epoch_optimizer(optimizer, model, cfg, lr: float):
    """The optimizer for the next epoch: the same one, or (train.reset_optimizer = "epoch") a fresh SGD whose
    momentum starts from zero, as the reference code re-creates it every epoch."""
    if optimizer is None or cfg.train.reset_optimizer == "epoch":
        return make_optimizer(model, cfg, lr)
    return optimizer


def run(ctx: StageContext) -> StageResult:
    cfg, t = ctx.cfg, ctx.cfg.train
    generator = seed_everything(cfg.seed)
    device = device_of(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train, val, _ = data_splits(cfg)
    val_eval = val.subset(t.val_subset, cfg.data.split_seed + 3)
    ctx.log(f"{len(train)} train / {len(val_eval)} val images on {device}")
    model = create_model(cfg.model.arch, **model_kwargs(cfg)).to(device)
    if cfg.model.ensemble_impl == "grouped":
        from models.grouped import to_grouped

        model = to_grouped(model)   # same initial weights as the member list
        ctx.log(f"training the {cfg.model.ensemble} members as one grouped-convolution network")
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    world = distributed.active()
    trained = distributed.prepare(model, world, device, t.batch_size, ctx.log,
                                  cfg.train.cuda_graphs)   # `model` stays unwrapped
    optimizer = None
    attack = training_attack(cfg)
    select_on = "val_robust" if validation_attack(cfg) is not None else "val_natural"
    best, best_state, log_lines = None, None, []
    start = 0
    state = resume.load(ctx.resume_dir)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer = make_optimizer(model, cfg, t.lr)
        optimizer.load_state_dict(state["optimizer"])
        best, best_state, log_lines, start = state["best"], state["best_state"], state["log_lines"], state["epoch"]
        resume.set_rng_state(state["rng"], generator)
        ctx.log(f"resuming after epoch {start}/{t.epochs} from the stage's last checkpoint")
    for epoch in range(start, t.epochs):
        optimizer = epoch_optimizer(optimizer, model, cfg, t.lr)
        set_lr(optimizer, step_lr(epoch, base_lr=t.lr, epochs=t.epochs, milestones=t.lr_milestones, gamma=t.lr_gamma,
                                  warmup_epochs=t.lr_warmup_epochs))
        attack_gen = distributed.epoch_attack_generator(cfg.seed, epoch, world)
        stats = train_epoch(trained, train, optimizer, batch_size=t.batch_size, attack=attack, generator=generator,
                            augment=t.augment, device=device, progress=f"train {epoch + 1}/{t.epochs}",
                            precision=t.precision, channels_last=t.channels_last, world=world,
                            attack_generator=attack_gen, cuda_graphs=t.cuda_graphs)
        distributed.end_epoch(model, world)
        stats.update(validate(model, val_eval, cfg, device, generator))
        stats["epoch"] = epoch + 1
        log_lines.append(json.dumps(stats))
        ctx.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
        if best is None or stats[select_on] > best[select_on]:
            best, best_state = stats, snapshot(model)
        if resume.due(epoch + 1, t.epochs, t.checkpoint_every) and (world is None or world.is_main):
            resume.save(ctx.resume_dir, {"epoch": epoch + 1, "model": model.state_dict(),
                                         "optimizer": optimizer.state_dict(), "best": best, "best_state": best_state,
                                         "log_lines": log_lines, "rng": resume.rng_state(generator)})
    model.load_state_dict(best_state)
    if cfg.model.ensemble_impl == "grouped":
        from models.grouped import to_members

        model = to_members(model, create_model(cfg.model.arch, **model_kwargs(cfg)).to(device))
    (ctx.out_dir / "epochs.jsonl").write_text("\n".join(log_lines) + "\n")
    outputs = save_model(model, describe(model, cfg.model.arch, model_kwargs(cfg)), ctx.out_dir)
    outputs["epochs_log"] = ctx.out_dir / "epochs.jsonl"
    metrics = {"selected_epoch": best["epoch"], "selected_on": select_on,
               "val": {k: best[k] for k in ("val_natural", "val_robust") if k in best},
               "train_images_per_s": sum(json.loads(x)["images_per_s"] for x in log_lines) / len(log_lines),
               "params": sum(p.numel() for p in model.parameters()), "world_size": world.size if world else 1,
               **sparsity_metrics(model, PAPER_ZERO_TOL)}
    return StageResult(outputs, metrics)


# No test-set numbers here: the eval stage owns them, so re-evaluating never retrains.
STAGE = Stage("train", sections=("seed", "data", "model", "train"), inputs=(), run=run)
