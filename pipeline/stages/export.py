"""Stage ``export``: ONNX for the dense (train) and the pruned (surgery) model, checked and simplified."""
from __future__ import annotations

import json

import torch

from ..data import CLASSES
from ..runio import load_model
from ..runner import Stage, StageContext, StageResult


def _metadata(cfg, variant: str, sparsity: dict) -> dict[str, str]:
    return {
        "variant": variant,
        "arch": cfg.model.arch, "ensemble": str(cfg.model.ensemble),
        "noise_coef_trained": str(cfg.model.noise_coef),
        # The graph is deterministic: EnResNet's test-time noise is not part of the exported function.
        "noise_in_graph": "false",
        "input": "image: float32 [N,3,32,32], RGB, values in [0,1] (normalisation is inside the graph)",
        "output": "logits: float32 [N,10]",
        "labels": json.dumps(list(CLASSES)),
        "channel_sparsity_percent": f"{sparsity['channel_sparsity']:.4f}",
        "weight_sparsity_percent": f"{sparsity['weight_sparsity']:.4f}",
        "zero_channels": str(sparsity["zero_channels"]), "total_channels": str(sparsity["total_channels"]),
        "run_name": cfg.name,
    }


def run(ctx: StageContext) -> StageResult:
    from export import export_onnx, onnx_macs

    cfg, e = ctx.cfg, ctx.cfg.export
    parity = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(cfg.seed))
    outputs, metrics = {}, {}
    for variant, stage in (("dense", "train"), ("pruned", "surgery")):
        model = load_model(ctx.inputs[stage]["model_weights"], ctx.inputs[stage]["model_arch"]).eval()
        sparsity_src = ctx.metrics_of[stage]
        path = ctx.out_dir / f"{variant}.onnx"
        rep = export_onnx(model, path, opset=e.opset, dynamo=e.dynamo, simplify=e.simplify,
                          metadata=_metadata(cfg, variant, sparsity_src), parity_inputs=parity,
                          parity_tol=e.parity_tol)
        outputs[f"{variant}_onnx"] = path
        metrics[variant] = {"opset": rep.opset, "simplified": rep.simplified, "nodes_before": rep.nodes_before,
                            "nodes_after": rep.nodes_after, "parity_max_abs_diff": rep.parity_max_abs_diff,
                            "onnx_params": rep.params, "onnx_macs": onnx_macs(path)}
        ctx.log(f"{variant}: {path.name} nodes {rep.nodes_before}->{rep.nodes_after}, "
                f"torch-vs-ORT max|d| {rep.parity_max_abs_diff:.2e}")
    return StageResult(outputs, metrics)


STAGE = Stage("export", sections=("name", "seed", "export"), inputs=("train", "surgery"), run=run)
