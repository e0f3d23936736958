"""Stage ``prune``: the sparsifier ``prune.method`` names (pipeline/catalog/sparsifiers.py: RGSM channels, RVSM
weights, projection ADMM), with adversarial training continuing throughout; ``method = "none"`` passes the train
checkpoint through (a dense baseline row)."""
from __future__ import annotations

import json

import torch

from models import describe

from ..algorithms.sparsity import sparsity_metrics
from ..catalog.sparsifiers import NONE, SPARSIFIERS
from ..core import seeds
from ..run.checkpoints import load_model, save_model
from ..run.stage import Stage, StageContext, StageResult
from ..train import distributed, resume, sparsify
from ..train.recipe import Schedule, fit
from ..train.setup import (build_model, data_splits, device_of, image_shape, model_kwargs, seed_everything,
                           validation_split)


def run(ctx: StageContext) -> StageResult:
    cfg, p = ctx.cfg, ctx.cfg.prune
    seed = cfg.seed + seeds.PRUNE
    generator = seed_everything(seed)
    device = device_of(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if p.init == "finetune" or p.method == NONE:
        model = load_model(ctx.inputs["train"]["model_weights"], ctx.inputs["train"]["model_arch"], device)
        ctx.log("dense baseline: the train checkpoint passes through" if p.method == NONE
                else "fine-tuning the train checkpoint")
    else:
        model = build_model(cfg).to(device)
        ctx.log("pruning from initialisation")
    if p.method == NONE:
        outputs = save_model(model, describe(model, cfg.model.arch, model_kwargs(cfg)), ctx.out_dir)
        return StageResult(outputs, {"method": NONE, **sparsity_metrics(model, p.zero_tol)})
    entry = SPARSIFIERS[p.method]
    train, val, _ = data_splits(cfg)
    val_eval = validation_split(cfg, val)
    members = model   # the member list: what is saved and what the sparsity metrics count
    if cfg.model.ensemble_impl == "grouped":
        if entry.meta.get("grouped") and (entry.meta["groups"] == "kernels" or p.groups == "paper"):
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
    table = json.loads(ctx.inputs["latency"]["table"].read_text()) if p.budget == "latency" else None
    sparsifier = sparsify.make_sparsifier(model, p, seed=cfg.seed, device=device, latency_table=table,
                                          image_shape=image_shape(cfg))
    ctx.log(sparsify.describe(sparsifier, p))
    _hint_budget_every(sparsifier, p, ctx.log)
    world = distributed.active()
    trained = distributed.prepare(model, world, device, cfg.train.batch_size, ctx.log,
                                  cfg.train.cuda_graphs)   # `model` stays unwrapped
    before_final = {}

    def before_projection(last: bool) -> None:
        if last:
            before_final.update(sparsity_metrics(member_view(), p.zero_tol))

    def epoch_stats() -> dict:
        stats = sparsity_metrics(member_view(), p.zero_tol)
        if p.groups == "coupled":
            stats["kept_channels"] = sum(sparsifier.kept_widths().values())
            stats.update(sparsifier.budget_status())   # the layout's cost: inside the budget after each projection
        return stats

    fitted = fit(ctx, model, trained, name="prune", seed=seed, generator=generator, train=train, val=val_eval,
                 device=device, world=world, sparsifier=sparsifier, state=state, before_projection=before_projection,
                 epoch_stats=epoch_stats,
                 schedule=Schedule(p.epochs, p.lr, p.lr_milestones, p.lr_gamma, cfg.train.lr_warmup_epochs))
    # The pruned model is the last projected iterate: earlier epochs are less sparse, so selecting among them
    # on validation accuracy would trade away the sparsity the stage exists for.
    model = member_view()
    outputs = save_model(model, describe(model, cfg.model.arch, model_kwargs(cfg)), ctx.out_dir)
    outputs["epochs_log"] = ctx.out_dir / "epochs.jsonl"
    last = json.loads(fitted.log_lines[-1]) if fitted.log_lines else {}
    state = sparsifier.state_dict()
    metrics = {"method": p.method, "threshold": getattr(sparsifier, "threshold", None),
               "sparsifier": {k: v for k, v in state.items() if k not in ("z", "u")}, "groups": p.groups,
               "val": {k: last[k] for k in ("val_natural", "val_robust") if k in last},
               "world_size": world.size if world else 1, **sparsity_metrics(model, p.zero_tol)}
    if hasattr(sparsifier, "kept_widths"):
        metrics.update({"align": sparsifier.align, "family_widths": sparsifier.kept_widths()})
    if getattr(sparsifier, "budget", None) is not None:
        b = sparsifier.budget
        metrics["budget"] = {"kind": b.kind, "target": p.target, "limit": b.limit, "dense": b.reference,
                             **sparsifier.budget_status()}
    if entry.meta.get("before_final"):
        # what the reference code would have reported: it never projects at the end
        metrics["before_final_projection"] = before_final
    return StageResult(outputs, metrics)


def _hint_budget_every(sparsifier, prune, log) -> None:
    """One solve of the budget, timed: a big network's exact layout solve at every step can cost more than the
    step itself, which prune.budget_every trades for a layout re-solved every N steps (and at each projection)."""
    import time

    budget = getattr(sparsifier, "budget", None)
    if budget is None:
        return
    t0 = time.perf_counter()
    budget.widths([f.sq_norms() for f in sparsifier.families], sparsifier.beta)
    seconds = time.perf_counter() - t0
    log(f"budget layout solve: {seconds * 1000:.0f} ms, re-solved every {prune.budget_every} step(s)")
    if seconds > 0.05 and prune.budget_every == 1:
        log(f"hint: the budget solve takes {seconds:.2f} s per step; prune.budget_every = 20 re-solves every 20 "
            "steps (each family keeps its largest groups in between; projections always re-solve)")


STAGE = Stage("prune", sections=("seed", "data", "model", "train", "prune"), inputs=("train", "latency"), run=run,
              tables=(SPARSIFIERS,))
