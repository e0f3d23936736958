"""Stage ``surgery``: physically remove the channels RGSM zeroed, wherever that is function-exact."""
from __future__ import annotations

import torch
import torch.nn as nn

from models import describe

from ..algorithms.sparsity import sparsity_metrics
from ..algorithms.surgery import count_params_macs, remove_dead_channels
from ..run.checkpoints import load_model, save_model
from ..run.stage import Stage, StageContext, StageResult
from ..train.setup import image_shape, model_kwargs


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    masked = load_model(ctx.inputs["prune"]["model_weights"], ctx.inputs["prune"]["model_arch"]).eval()
    # Random images exercise every channel; the parity bound is checked inside remove_dead_channels.
    shape = image_shape(cfg)
    example = torch.rand(16, *shape, generator=torch.Generator().manual_seed(cfg.seed))
    result = remove_dead_channels(masked, example, tol=cfg.surgery.tol)
    pruned = result.model
    sparsity = sparsity_metrics(masked, cfg.surgery.tol)
    params_before, macs_before = count_params_macs(masked, (1, *shape))
    params_after, macs_after = count_params_macs(pruned, (1, *shape))
    outputs = save_model(pruned, describe(pruned, cfg.model.arch, model_kwargs(cfg)), ctx.out_dir)
    metrics = {"max_abs_diff": result.max_abs_diff, "removed_channels": result.removed_channels,
               "zero_channels": result.zero_channels, "total_channels": result.total_channels,
               "removed_fraction": result.removed_fraction, "kept_for_shape": result.kept_for_shape,
               "removed_branches": result.removed_branches,
               "params_before": params_before, "params_after": params_after,
               "macs_before": macs_before, "macs_after": macs_after,
               # The paper's figures describe the masked model that surgery started from.
               "channel_sparsity": 100.0 * result.zero_channels / result.total_channels,
               **{k: sparsity[k] for k in ("channel_weight_sparsity", "weight_sparsity", "conv_weights")}}
    metrics["layers"] = layer_widths(masked, pruned)
    if result.removed_branches:
        ctx.log(f"removed {len(result.removed_branches)} residual branch(es) whole: {', '.join(result.removed_branches)}")
    ctx.log(f"removed {result.removed_channels}/{result.zero_channels} zero channels, "
            f"params {params_before} -> {params_after}, MACs {macs_before} -> {macs_after}, "
            f"max|dlogits| {result.max_abs_diff:.2e}")
    return StageResult(outputs, metrics)


def _in_out(m: nn.Module) -> tuple[int, int]:
    return (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features)


def layer_widths(dense: nn.Module, pruned: nn.Module) -> list[dict]:
    """Input/output channels of every conv and linear layer, before and after surgery (0 once removed)."""
    after = dict(pruned.named_modules())
    rows = []
    for name, m in dense.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            (din, dout), (pin, pout) = _in_out(m), (_in_out(after[name]) if name in after else (0, 0))
            rows.append({"name": name, "in_dense": din, "in_pruned": pin, "out_dense": dout, "out_pruned": pout})
    return rows


STAGE = Stage("surgery", sections=("surgery",), inputs=("prune",), run=run)
