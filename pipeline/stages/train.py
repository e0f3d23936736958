"""Stage ``train``: PGD adversarial training; the checkpoint is selected on validation robust accuracy."""
from __future__ import annotations

import json

import torch

from models import builder_problem, describe, is_external

from ..algorithms.sparsity import PAPER_ZERO_TOL, sparsity_metrics
from ..core.errors import UserError
from ..run.checkpoints import save_model
from ..run.stage import Stage, StageContext, StageResult
from ..train import distributed, resume
from ..train.recipe import Schedule, fit, validation_attack
from ..train.setup import (build_model, data_info, data_splits, device_of, model_kwargs, seed_everything,
                           validation_split)


def run(ctx: StageContext) -> StageResult:
    cfg, t = ctx.cfg, ctx.cfg.train
    generator = seed_everything(cfg.seed)
    device = device_of(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train, val, _ = data_splits(cfg)
    val_eval = validation_split(cfg, val)
    info = data_info(cfg)
    # the builder meets the data before any epoch: a user's model that returns no Module, or logits of the wrong
    # shape for the class count, is one line now instead of a shape error deep in training
    problem = builder_problem(cfg.model.arch, model_kwargs(cfg), info.num_classes, tuple(info.shape)) \
        if is_external(cfg.model.arch) else None
    if problem is not None:
        raise UserError(f"model.arch = {cfg.model.arch!r}: {problem}")
    ctx.log(f"{len(train)} train / {len(val_eval)} val images {'x'.join(map(str, info.shape))}, "
            f"{info.num_classes} classes ({cfg.data.dataset}) on {device}")
    model = build_model(cfg).to(device)
    if cfg.model.ensemble_impl == "grouped":
        from models.grouped import to_grouped

        model = to_grouped(model)   # same initial weights as the member list
        ctx.log(f"training the {cfg.model.ensemble} members as one grouped-convolution network")
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    state = resume.load(ctx.resume_dir)
    if state is not None:
        model.load_state_dict(state["model"])
    world = distributed.active()
    trained = distributed.prepare(model, world, device, t.batch_size, ctx.log,
                                  cfg.train.cuda_graphs)   # `model` stays unwrapped
    select_on = "val_robust" if validation_attack(cfg) is not None else "val_natural"
    fitted = fit(ctx, model, trained, name="train", seed=cfg.seed, generator=generator, train=train, val=val_eval,
                 device=device, world=world, state=state, select_on=select_on,
                 schedule=Schedule(t.epochs, t.lr, t.lr_milestones, t.lr_gamma, t.lr_warmup_epochs))
    best = fitted.best
    model.load_state_dict(fitted.best_state)
    if cfg.model.ensemble_impl == "grouped":
        from models.grouped import to_members

        model = to_members(model, build_model(cfg).to(device))
    outputs = save_model(model, describe(model, cfg.model.arch, model_kwargs(cfg)), ctx.out_dir)
    outputs["epochs_log"] = ctx.out_dir / "epochs.jsonl"
    metrics = {"selected_epoch": best["epoch"], "selected_on": select_on,
               "val": {k: best[k] for k in ("val_natural", "val_robust") if k in best},
               "train_images_per_s": sum(json.loads(x)["images_per_s"] for x in fitted.log_lines) / len(fitted.log_lines),
               "params": sum(p.numel() for p in model.parameters()), "world_size": world.size if world else 1,
               **sparsity_metrics(model, PAPER_ZERO_TOL)}
    return StageResult(outputs, metrics)


# No test-set numbers here: the eval stage owns them, so re-evaluating never retrains.
STAGE = Stage("train", sections=("seed", "data", "model", "train"), inputs=(), run=run)
