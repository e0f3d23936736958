"""Stage ``prune``: RGSM channel pruning with adversarial training continuing throughout."""
from __future__ import annotations

import json

import torch

from models import create_model, describe

from ..algorithms.rgsm import RGSM
from ..algorithms.sparsity import conv_input_groups
from ..runio import load_model, save_model
from ..runner import Stage, StageContext, StageResult
from ..training import set_lr, step_lr, train_epoch
from .common import data_splits, device_of, model_kwargs, seed_everything, test_set_metrics
from .train import make_optimizer, sparsity_metrics, training_attack, validate


def run(ctx: StageContext) -> StageResult:
    cfg, p = ctx.cfg, ctx.cfg.prune
    generator = seed_everything(cfg.seed + 1)
    device = device_of(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train, val, test = data_splits(cfg)
    val_eval = val.subset(cfg.train.val_subset, cfg.data.split_seed + 3)
    if p.init == "finetune":
        model = load_model(ctx.inputs["train"]["model_weights"], ctx.inputs["train"]["model_arch"], device)
        ctx.log("fine-tuning the train checkpoint")
    else:
        model = create_model(cfg.model.arch, **model_kwargs(cfg)).to(device)
        ctx.log("pruning from initialisation")
    # Every conv of every member, stem and 1x1 shortcuts included: groups are their input channels.
    sparsifier = RGSM([w for _, w in conv_input_groups(model)], beta=p.beta, lambda1=p.lambda1, lambda2=p.lambda2)
    ctx.log(f"RGSM threshold sqrt(2*{p.lambda1}/{p.beta}) = {sparsifier.threshold:.4g}")
    optimizer = make_optimizer(model, cfg, p.lr)
    attack = training_attack(cfg)
    log_lines = []
    for epoch in range(p.epochs):
        set_lr(optimizer, step_lr(epoch, base_lr=p.lr, epochs=p.epochs, milestones=p.lr_milestones, gamma=p.lr_gamma))
        stats = train_epoch(model, train, optimizer, batch_size=cfg.train.batch_size, attack=attack,
                            generator=generator, augment=cfg.train.augment, device=device, sparsifier=sparsifier,
                            progress=f"prune {epoch + 1}/{p.epochs}")
        sparsifier.project()
        stats.update(validate(model, val_eval, cfg, device, generator))
        stats.update(sparsity_metrics(model, p.zero_tol))
        stats["epoch"] = epoch + 1
        log_lines.append(json.dumps(stats))
        ctx.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
    # The pruned model is the last projected iterate: earlier epochs are less sparse, so selecting among them
    # on validation accuracy would trade away the sparsity the stage exists for.
    (ctx.out_dir / "epochs.jsonl").write_text("\n".join(log_lines) + "\n")
    outputs = save_model(model, describe(model, cfg.model.arch, model_kwargs(cfg)), ctx.out_dir)
    outputs["epochs_log"] = ctx.out_dir / "epochs.jsonl"
    last = json.loads(log_lines[-1]) if log_lines else {}
    metrics = {"threshold": sparsifier.threshold, "sparsifier": sparsifier.state_dict(),
               "val": {k: last[k] for k in ("val_natural", "val_robust") if k in last},
               **sparsity_metrics(model, p.zero_tol),
               "test": test_set_metrics(model, test, cfg, device, generator, ctx.log)}
    return StageResult(outputs, metrics)


STAGE = Stage("prune", sections=("seed", "data", "model", "train", "prune", "eval"), inputs=("train",), run=run)
