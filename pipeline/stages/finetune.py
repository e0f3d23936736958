"""Stage ``finetune``: adversarial training of the physically pruned network, its architecture fixed (the
surgery stage's widths and removed branches), with the train stage's recipe -- attack, noise, optimizer,
validation-based selection and resumable checkpoints. ``finetune.epochs = 0`` (the default) passes the surgery
stage's model through unchanged. Its model is the one eval, export and bench call "pruned"."""
from __future__ import annotations

import json
import shutil

import torch

from ..core import seeds
from ..core.files import naming
from ..run.checkpoints import load_model, save_model
from ..run.stage import Stage, StageContext, StageResult
from ..train import distributed, resume
from ..train.recipe import Schedule, fit, validation_attack
from ..train.setup import data_splits, device_of, seed_everything, validation_split

# what export and the report read about how the model was pruned: the masked model's figures, carried along
PRUNED_FIGURES = ("channel_sparsity", "channel_weight_sparsity", "weight_sparsity", "conv_weights", "zero_channels",
                  "total_channels")


def run(ctx: StageContext) -> StageResult:
    cfg, f = ctx.cfg, ctx.cfg.finetune
    source = ctx.inputs["surgery"]
    figures = {k: ctx.metrics_of["surgery"][k] for k in PRUNED_FIGURES if k in ctx.metrics_of["surgery"]}
    if f.epochs == 0:
        outputs = {}
        for key in ("model_weights", "model_arch"):
            outputs[key] = ctx.out_dir / source[key].name
            with naming(outputs[key]):
                shutil.copyfile(source[key], outputs[key])
        ctx.log("finetune.epochs = 0: the surgery stage's model passes through")
        return StageResult(outputs, {"epochs": 0, **figures})
    generator = seed_everything(cfg.seed + seeds.FINETUNE)
    device = device_of(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train, val, _ = data_splits(cfg)
    val_eval = validation_split(cfg, val)
    model = load_model(source["model_weights"], source["model_arch"], device)
    description = json.loads(source["model_arch"].read_text())
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    state = resume.load(ctx.resume_dir)
    if state is not None:
        model.load_state_dict(state["model"])
    world = distributed.active()
    trained = distributed.prepare(model, world, device, cfg.train.batch_size, ctx.log, cfg.train.cuda_graphs)
    ctx.log(f"fine-tuning the pruned network ({sum(p.numel() for p in model.parameters())} parameters) for "
            f"{f.epochs} epoch(s)")
    select_on = "val_robust" if validation_attack(cfg) is not None else "val_natural"
    fitted = fit(ctx, model, trained, name="finetune", seed=cfg.seed + seeds.FINETUNE, generator=generator,
                 train=train, val=val_eval, device=device, world=world, state=state, select_on=select_on,
                 schedule=Schedule(f.epochs, f.lr, f.lr_milestones, f.lr_gamma))
    model.load_state_dict(fitted.best_state)
    outputs = save_model(model, description, ctx.out_dir)
    outputs["epochs_log"] = ctx.out_dir / "epochs.jsonl"
    best = fitted.best
    return StageResult(outputs, {"epochs": f.epochs, "selected_epoch": best["epoch"], "selected_on": select_on,
                                 "val": {k: best[k] for k in ("val_natural", "val_robust") if k in best},
                                 "world_size": world.size if world else 1, **figures})


STAGE = Stage("finetune", sections=("seed", "data", "train", "finetune"), inputs=("surgery",), run=run)
