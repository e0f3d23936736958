"""Stage ``prune``: RGSM channel pruning with adversarial training continuing throughout."""
from __future__ import annotations

import json

import torch

from models import create_model, describe

from ..algorithms.groups import coupled_families, group_costs, paper_families
from ..algorithms.rgsm import RGSM
from ..hardware import resolve_align
from ..runio import load_model, save_model
from ..runner import Stage, StageContext, StageResult
from ..training import set_lr, step_lr, train_epoch
from .common import data_splits, device_of, model_kwargs, seed_everything
from .train import make_optimizer, sparsity_metrics, training_attack, validate


def run(ctx: StageContext) -> StageResult:
    cfg, p = ctx.cfg, ctx.cfg.prune
    generator = seed_everything(cfg.seed + 1)
    device = device_of(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train, val, _ = data_splits(cfg)
    val_eval = val.subset(cfg.train.val_subset, cfg.data.split_seed + 3)
    if p.init == "finetune":
        model = load_model(ctx.inputs["train"]["model_weights"], ctx.inputs["train"]["model_arch"], device)
        ctx.log("fine-tuning the train checkpoint")
    else:
        model = create_model(cfg.model.arch, **model_kwargs(cfg)).to(device)
        ctx.log("pruning from initialisation")
    sparsifier = make_sparsifier(model, cfg, device)
    ctx.log(f"RGSM ({p.groups} groups, {len(sparsifier.families)} families, align {sparsifier.align}) "
            f"threshold sqrt(2*{p.lambda1}/{p.beta}) = {sparsifier.threshold:.4g}"
            + (f" for an average paper group (scaled per family by {p.group_cost})" if p.groups == "coupled" else ""))
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
        if p.groups == "coupled":
            stats["kept_channels"] = sum(sparsifier.kept_widths().values())
        stats["epoch"] = epoch + 1
        log_lines.append(json.dumps(stats))
        ctx.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
    # The pruned model is the last projected iterate: earlier epochs are less sparse, so selecting among them
    # on validation accuracy would trade away the sparsity the stage exists for.
    (ctx.out_dir / "epochs.jsonl").write_text("\n".join(log_lines) + "\n")
    outputs = save_model(model, describe(model, cfg.model.arch, model_kwargs(cfg)), ctx.out_dir)
    outputs["epochs_log"] = ctx.out_dir / "epochs.jsonl"
    last = json.loads(log_lines[-1]) if log_lines else {}
    metrics = {"threshold": sparsifier.threshold, "sparsifier": sparsifier.state_dict(), "groups": p.groups,
               "align": sparsifier.align, "family_widths": sparsifier.kept_widths(),
               "val": {k: last[k] for k in ("val_natural", "val_robust") if k in last},
               **sparsity_metrics(model, p.zero_tol)}
    return StageResult(outputs, metrics)


def make_sparsifier(model, cfg, device) -> RGSM:
    """The paper's groups (every conv's input channels, stem and 1x1 shortcuts included), or coupled
    removable channels with cost-scaled lambdas and widths kept at a multiple of the hardware block."""
    p = cfg.prune
    if p.groups == "paper":
        return RGSM(paper_families(model), beta=p.beta, lambda1=p.lambda1, lambda2=p.lambda2)
    align = resolve_align(p.align)
    example = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    # min_keep = align: a family never drops below one block, so no layer reaches width 0 and surgery never
    # has to keep a zero channel for shape (which would break the alignment).
    families = coupled_families(model, example)
    return RGSM(families, beta=p.beta, lambda1=p.lambda1, lambda2=p.lambda2, align=align, min_keep=align,
                scales=group_costs(model, families, example, p.group_cost))


STAGE = Stage("prune", sections=("seed", "data", "model", "train", "prune"), inputs=("train",), run=run)
