"""``pipeline bench-train --variants``: images/s of the PGD adversarial training step for every variant in one
run -- member list vs grouped convs, fp32 vs bf16 autocast, channels_last, CUDA graphs, batch sizes -- beside the baseline
(members, fp32, the config's batch) measured in the same call, plus an exactness check of the grouped network.

Synthetic uint8 images on the device (throughput does not depend on the pixels), so the script needs no data
and can be carried to a GPU machine as is. One training step = the train stage's own ``TrainStep``: the config's
training attack (PGD-k) + forward, cross-entropy, backward, SGD step. Timed after ``warmup`` steps (which include a
CUDA graph's warm-up and capture) with the device synchronised.
"""
from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from models import create_model, noise_disabled

from ..config import ConfigError, RunConfig
from ..train.loop import WARMUP_STEPS, TrainStep
from ..train.recipe import make_optimizer, training_attack
from ..train.setup import model_kwargs, seed_everything, synchronize


def equivalence(cfg: RunConfig, device: torch.device) -> dict:
    """max |Δ| of logits and of the stem's gradient, members vs grouped, float64, noise off, train mode."""
    from models.grouped import to_grouped

    torch.manual_seed(cfg.seed)
    members = create_model(cfg.model.arch, **model_kwargs(cfg)).double().to(device).train()
    grouped = to_grouped(members)
    x = torch.rand(16, 3, 32, 32, dtype=torch.float64, device=device)
    y = torch.randint(0, 10, (16,), device=device)
    out = {}
    with noise_disabled(members), noise_disabled(grouped):
        lm, lg = members(x), grouped(x)
        F.cross_entropy(lm, y).backward()
        F.cross_entropy(lg, y).backward()
    out["max_abs_logits"] = float((lm - lg).detach().abs().max())
    stem = torch.cat([m.conv1.weight.grad for m in members.members])
    out["max_abs_stem_grad"] = float((stem - grouped.conv1.weight.grad).abs().max())
    return out


def _images_per_s(cfg: RunConfig, device: torch.device, attack, *, batch: int, precision: str, impl: str,
                  channels_last: bool, cuda_graphs: bool, prune_step: bool, steps: int, warmup: int) -> float:
    """One variant on a fresh model: ``warmup`` untimed steps (a CUDA graph's warm-up and capture among them),
    then ``steps`` timed ones. Everything it allocates (a graph's memory pool too) is freed on return."""
    from models.grouped import to_grouped

    from ..train.sparsify import make_sparsifier

    model = create_model(cfg.model.arch, **model_kwargs(cfg)).to(device)
    if impl == "grouped":
        model = to_grouped(model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    optimizer = make_optimizer(model, cfg, cfg.train.lr)
    x8 = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    # the train stage's own step (pipeline/training.py)
    step = TrainStep(model, optimizer, attack=attack, precision=precision, cuda_graphs=cuda_graphs,
                     sparsifier=make_sparsifier(model, cfg.prune, seed=cfg.seed, device=device) if prune_step else None,
                     warmup=min(WARMUP_STEPS, max(warmup - 1, 0)))
    for timed in (False, True):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps if timed else warmup):
            step((x8.float() / 255).contiguous(memory_format=fmt), y)
        synchronize(device)
    return batch * steps / (time.perf_counter() - start)


def run_variants(cfg: RunConfig, *, device: torch.device, batches: list[int], precisions: list[str],
                 impls: list[str], channels_last: list[bool], steps: int, warmup: int,
                 cuda_graphs: list[bool] = (False,), prune_step: bool = False) -> dict:
    for name, values, allowed in (("--precisions", precisions, ("fp32", "bf16")),
                                  ("--impls", impls, ("members", "grouped"))):
        if not values or any(v not in allowed for v in values):
            raise ConfigError(f"{name}: expected a comma-separated list from {', '.join(allowed)}, got {values}")
    if not batches or any(b <= 0 for b in batches):
        raise ConfigError(f"--batches: expected positive batch sizes, got {batches}")
    if steps <= 0 or warmup < 0:
        raise ConfigError(f"--steps/--warmup: expected > 0 / >= 0, got {steps} / {warmup}")
    if any(cuda_graphs) and device.type != "cuda":
        raise ConfigError(f"--cuda-graphs: true needs --device cuda (CUDA graphs), got device {device}")
    method, groups = cfg.prune.method, cfg.prune.groups
    if prune_step and (method not in ("rgsm", "rvsm") or (method == "rgsm" and groups != "paper")):
        raise ConfigError(f"--prune-step: expected prune.method = \"rgsm\" (paper groups) or \"rvsm\", the sparsifiers "
                          f"the grouped network runs, got prune.method = {method!r}, prune.groups = {groups!r}")
    attack = training_attack(cfg)
    seed_everything(cfg.seed)
    variants = [(cfg.train.batch_size, "fp32", "members", False, False)]   # the baseline first
    variants += [(b, p, i, c, g) for b in batches for p in precisions for i in impls for c in channels_last
                 for g in cuda_graphs if (b, p, i, c, g) != variants[0]]
    rows = []
    for batch, precision, impl, cl, graphs in variants:
        rate = _images_per_s(cfg, device, attack, batch=batch, precision=precision, impl=impl, channels_last=cl,
                             cuda_graphs=graphs, prune_step=prune_step, steps=steps, warmup=warmup)
        rows.append({"batch": batch, "precision": precision, "impl": impl, "channels_last": cl,
                     "cuda_graphs": graphs, "images_per_s": rate})
        print(f"batch {batch:5d} {precision} {impl:8s} channels_last={str(cl):5s} cuda_graphs={str(graphs):5s} "
              f"{rate:10.1f} images/s", flush=True)
    base = rows[0]["images_per_s"]
    for r in rows:
        r["vs_baseline"] = r["images_per_s"] / base
    a = cfg.train.attack
    result = {"model": cfg.model.arch, "ensemble": cfg.model.ensemble, "noise_coef": cfg.model.noise_coef,
              "step": f"prune ({method}, regularize + pull every step)" if prune_step else "train",
              "attack": a.kind if attack is not None else "none", "attack_steps": a.steps if a.kind == "pgd" else 1,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "steps": steps, "warmup": warmup,
              "equivalence": equivalence(cfg, device), "rows": rows}
    print(f"\n{result['step']} step: {result['model']} En{result['ensemble']}, "
          f"{result['attack']}-{result['attack_steps']}, "
          f"{result['device']}, torch {result['torch']}; baseline = first row")
    print("| batch | precision | impl | channels_last | cuda_graphs | images/s | vs baseline |\n"
          "|---:|---|---|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['precision']} | {r['impl']} | {r['channels_last']} | {r['cuda_graphs']} "
              f"| {r['images_per_s']:.1f} | {r['vs_baseline']:.2f}x |")
    print(f"grouped vs members (float64, noise off): max|Δlogits| {result['equivalence']['max_abs_logits']:.2e}, "
          f"max|Δ stem grad| {result['equivalence']['max_abs_stem_grad']:.2e}")
    print(json.dumps(result), flush=True)
    return result
