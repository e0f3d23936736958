"""Stage ``prune``: RGSM (channels), RVSM (weights) or projection ADMM, with adversarial training continuing
throughout; ``method = "none"`` passes the train checkpoint through (a dense baseline row)."""
from __future__ import annotations

import json

import torch

from models import create_model, describe

from .. import distributed, resume
from ..algorithms.admm import ADMM
from ..algorithms.groups import coupled_families, group_costs, paper_families
from ..algorithms.rgsm import RGSM
from ..algorithms.rvsm import RVSM
from ..algorithms.sparsity import sparsity_metrics
from ..hardware import resolve_align
from ..runio import load_model, save_model
from ..runner import Stage, StageContext, StageResult
from ..training import set_lr, step_lr, train_epoch
from .common import data_splits, device_of, model_kwargs, seed_everything
from .train import epoch_optimizer, make_optimizer, training_attack, validate


def run(ctx: StageContext) -> StageResult:
    cfg, p = ctx.cfg, ctx.cfg.prune
    generator = seed_everything(cfg.seed + 1)
    device = device_of(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if p.init == "finetune" or p.method == "none":
        model = load_model(ctx.inputs["train"]["model_weights"], ctx.inputs["train"]["model_arch"], device)
        ctx.log("dense baseline: the train checkpoint passes through" if p.method == "none"
                else "fine-tuning the train checkpoint")
    else:
        model = create_model(cfg.model.arch, **model_kwargs(cfg)).to(device)
        ctx.log("pruning from initialisation")
    if p.method == "none":
        outputs = save_model(model, describe(model, cfg.model.arch, model_kwargs(cfg)), ctx.out_dir)
        return StageResult(outputs, {"method": "none", **sparsity_metrics(model, p.zero_tol)})
    train, val, _ = data_splits(cfg)
    val_eval = val.subset(cfg.train.val_subset, cfg.data.split_seed + 3)
    members = model   # the member list: what is saved and what the sparsity metrics count
    if cfg.model.ensemble_impl == "grouped":
        if p.method == "rvsm" or (p.method == "rgsm" and p.groups == "paper"):
            from models.grouped import to_grouped

            model = to_grouped(model)   # the sparsifier's groups stay per member (groups.paper_families)
            ctx.log(f"pruning the {cfg.model.ensemble} members as one grouped-convolution network")
        else:
            ctx.log(f"prune.method = {p.method!r} with prune.groups = {p.groups!r} runs on the member list "
                    "(the grouped network is used for RGSM with paper groups and RVSM)")
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)

    def member_view():
        from models.grouped import to_members

        return model if model is members else to_members(model, members)
    state = resume.load(ctx.resume_dir)
    if state is not None:   # weights first: a sparsifier may derive its state from them (ADMM's z)
        model.load_state_dict(state["model"])
    sparsifier = make_sparsifier(model, cfg, device)
    ctx.log(describe_sparsifier(sparsifier, cfg))
    world = distributed.active()
    trained = distributed.prepare(model, world, device, cfg.train.batch_size, ctx.log,
                                  cfg.train.cuda_graphs)   # `model` stays unwrapped
    optimizer = None
    attack = training_attack(cfg)
    log_lines, before_final, start = [], {}, 0
    if state is not None:
        sparsifier.load_state_dict(state["sparsifier"])
        optimizer = make_optimizer(model, cfg, p.lr)
        optimizer.load_state_dict(state["optimizer"])
        log_lines, start = state["log_lines"], state["epoch"]
        resume.set_rng_state(state["rng"], generator)
        ctx.log(f"resuming after epoch {start}/{p.epochs} from the stage's last checkpoint")
    for epoch in range(start, p.epochs):
        optimizer = epoch_optimizer(optimizer, model, cfg, p.lr)
        set_lr(optimizer, step_lr(epoch, base_lr=p.lr, epochs=p.epochs, milestones=p.lr_milestones, gamma=p.lr_gamma,
                                  warmup_epochs=cfg.train.lr_warmup_epochs))
        stats = train_epoch(trained, train, optimizer, batch_size=cfg.train.batch_size, attack=attack,
                            generator=generator, augment=cfg.train.augment, device=device, sparsifier=sparsifier,
                            progress=f"prune {epoch + 1}/{p.epochs}", precision=cfg.train.precision,
                            channels_last=cfg.train.channels_last, world=world,
                            attack_generator=distributed.epoch_attack_generator(cfg.seed + 1, epoch, world),
                            cuda_graphs=cfg.train.cuda_graphs)
        last = epoch == p.epochs - 1
        if last:
            before_final = sparsity_metrics(member_view(), p.zero_tol)
        sparsifier.end_epoch(last=last)
        distributed.end_epoch(model, world)   # after the projection: the check covers the sparsifier's steps too
        stats.update(validate(model, val_eval, cfg, device, generator))
        stats.update(sparsity_metrics(member_view(), p.zero_tol))
        if p.groups == "coupled":
            stats["kept_channels"] = sum(sparsifier.kept_widths().values())
        stats["epoch"] = epoch + 1
        log_lines.append(json.dumps(stats))
        ctx.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
        if resume.due(epoch + 1, p.epochs, cfg.train.checkpoint_every) and (world is None or world.is_main):
            resume.save(ctx.resume_dir, {"epoch": epoch + 1, "model": model.state_dict(),
                                         "optimizer": optimizer.state_dict(), "sparsifier": sparsifier.state_dict(),
                                         "log_lines": log_lines, "rng": resume.rng_state(generator)})
    # The pruned model is the last projected iterate: earlier epochs are less sparse, so selecting among them
    # on validation accuracy would trade away the sparsity the stage exists for.
    (ctx.out_dir / "epochs.jsonl").write_text("\n".join(log_lines) + "\n")
    model = member_view()
    outputs = save_model(model, describe(model, cfg.model.arch, model_kwargs(cfg)), ctx.out_dir)
    outputs["epochs_log"] = ctx.out_dir / "epochs.jsonl"
    last = json.loads(log_lines[-1]) if log_lines else {}
    state = sparsifier.state_dict()
    metrics = {"method": p.method, "threshold": getattr(sparsifier, "threshold", None),
               "sparsifier": {k: v for k, v in state.items() if k not in ("z", "u")}, "groups": p.groups,
               "val": {k: last[k] for k in ("val_natural", "val_robust") if k in last},
               "world_size": world.size if world else 1, **sparsity_metrics(model, p.zero_tol)}
    if isinstance(sparsifier, RGSM):
        metrics.update({"align": sparsifier.align, "family_widths": sparsifier.kept_widths()})
    if p.method == "admm":
        # what the reference code would have reported: it never projects at the end
        metrics["before_final_projection"] = before_final
    return StageResult(outputs, metrics)


def make_sparsifier(model, cfg, device):
    """RGSM on the paper's groups (every conv's input channels, stem and 1x1 shortcuts included) or on coupled
    removable channels (cost-scaled lambdas, widths kept at a multiple of the hardware block); RVSM and ADMM on
    every conv kernel."""
    p = cfg.prune
    if p.method == "rvsm":
        return RVSM([f.slices[0].tensor for f in paper_families(model)], beta=p.beta, lam=p.rvsm_lambda,
                    penalty=p.penalty, a=p.tl1_a)
    if p.method == "admm":
        return ADMM([f.slices[0].tensor for f in paper_families(model)], rho=p.rho, percentile=p.percentile,
                    sparsity=p.sparsity)
    if p.groups == "paper":
        return RGSM(paper_families(model), beta=p.beta, lambda1=p.lambda1, lambda2=p.lambda2, prox=p.rgsm_prox)
    align = resolve_align(p.align)
    example = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    # min_keep = align: a family never drops below one block, so no layer reaches width 0 and surgery never
    # has to keep a zero channel for shape (which would break the alignment).
    families = coupled_families(model, example)
    return RGSM(families, beta=p.beta, lambda1=p.lambda1, lambda2=p.lambda2, align=align, min_keep=align,
                scales=group_costs(model, families, example, p.group_cost), prox=p.rgsm_prox)


def describe_sparsifier(s, cfg) -> str:
    p = cfg.prune
    if isinstance(s, RVSM):
        return f"RVSM ({p.penalty}, {len(s.weights)} conv kernels) beta {p.beta}, lambda {p.rvsm_lambda}: " \
               f"weights with |w| <= {s.threshold:.4g} are pulled to 0"
    if isinstance(s, ADMM):
        return f"ADMM ({p.sparsity}, {len(s.weights)} conv kernels) rho {p.rho}: keep each layer's top " \
               f"{100 - p.percentile:g} % ({p.percentile:g}th percentile), final projection at the end"
    rule = f"sqrt(2*{p.lambda1}/{p.beta})" if s.prox == "hard" else f"{p.lambda1}/{p.beta} (group soft threshold)"
    return (f"RGSM ({p.groups} groups, {len(s.families)} families, align {s.align}) threshold {rule} = "
            f"{s.threshold:.4g}" + (f" for an average paper group (scaled per family by {p.group_cost})"
                                    if p.groups == "coupled" else ""))


STAGE = Stage("prune", sections=("seed", "data", "model", "train", "prune"), inputs=("train",), run=run)
