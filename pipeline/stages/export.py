"""Stage ``export``: ONNX for the dense (train) and the pruned (surgery) model, checked and simplified -- one file
per deployable noise variant (``export.noise_variants``):

- ``deterministic`` (``dense.onnx``, ``pruned.onnx``): EnResNet's test-time noise removed;
- ``stochastic`` (``<model>_stochastic.onnx``): the noise in the graph as trained -- ``0.1·std·N(0, I)`` after each
  residual sum, std over the whole tensor, so an image's prediction depends on the rest of its batch;
- ``per_sample`` (``<model>_per_sample.onnx``): the same noise with each image's std taken over that image alone.
Noisy graphs are checked statistically against torch (export/onnx_export.py)."""
from __future__ import annotations

import json

import torch

from models import ResidualNoise

from ..catalog.artifacts import DEPLOYED, NOISE_OF_VARIANT, SOURCES, artifact_name, output_key
from ..run.checkpoints import load_model
from ..run.stage import Stage, StageContext, StageResult
from ..train.setup import data_info, image_shape


def _metadata(cfg, model_name: str, variant: str, sparsity: dict, noise_coef: float) -> dict[str, str]:
    info = data_info(cfg)
    c, h, w = info.shape
    noise = {"deterministic": "none: EnResNet's test-time noise is not part of this graph",
             "stochastic": f"{noise_coef}*std(out)*N(0,I) after every residual sum, std over the whole batch tensor",
             "per_sample": f"{noise_coef}*std(out)*N(0,I) after every residual sum, std over each image"}[variant]
    return {
        "variant": model_name, "noise_variant": variant,
        "arch": cfg.model.arch, "ensemble": str(cfg.model.ensemble),
        "noise_coef_trained": str(cfg.model.noise_coef),
        "noise_in_graph": "false" if variant == "deterministic" else "true",
        "noise": noise,
        "input": f"image: float32 [N,{c},{h},{w}], {'RGB' if c == 3 else f'{c} channel(s)'}, values in [0,1] "
                 "(normalisation is inside the graph)",
        "output": f"logits: float32 [N,{info.num_classes}]",
        "labels": json.dumps(list(info.classes)),
        "channel_sparsity_percent": f"{sparsity['channel_sparsity']:.4f}",
        "weight_sparsity_percent": f"{sparsity['weight_sparsity']:.4f}",
        "zero_channels": str(sparsity["zero_channels"]), "total_channels": str(sparsity["total_channels"]),
        "run_name": cfg.name,
    }


def run(ctx: StageContext) -> StageResult:
    from export import export_onnx, onnx_macs

    cfg, e = ctx.cfg, ctx.cfg.export
    shape = image_shape(cfg)
    parity = torch.rand(8, *shape, generator=torch.Generator().manual_seed(cfg.seed))
    outputs, metrics = {}, {}
    for model_name in DEPLOYED:
        stage = SOURCES[model_name]
        model = load_model(ctx.inputs[stage]["model_weights"], ctx.inputs[stage]["model_arch"]).eval()
        coef = max((m.coef for m in model.modules() if isinstance(m, ResidualNoise)), default=0.0)
        for variant in e.noise_variants:
            name = artifact_name(model_name, variant)
            if variant != "deterministic" and coef == 0:
                ctx.log(f"{name}: skipped, the model has no test-time noise (noise_coef 0)")
                continue
            path = ctx.out_dir / f"{name}.onnx"
            rep = export_onnx(model, path, opset=e.opset, dynamo=e.dynamo, simplify=e.simplify,
                              metadata=_metadata(cfg, model_name, variant, ctx.metrics_of[stage], coef),
                              parity_inputs=parity, parity_tol=e.parity_tol, noise=NOISE_OF_VARIANT[variant],
                              parity_draws=e.parity_draws, image_shape=shape)
            outputs[output_key(name)] = path
            m = {"model": model_name, "noise_variant": variant, "opset": rep.opset, "simplified": rep.simplified,
                 "nodes_before": rep.nodes_before, "nodes_after": rep.nodes_after,
                 "parity_max_abs_diff": rep.parity_max_abs_diff, "onnx_params": rep.params,
                 "onnx_macs": onnx_macs(path), "bytes": path.stat().st_size, "random_nodes": rep.random_nodes}
            if variant != "deterministic":
                m.update(parity_mean_z=rep.parity_mean_z, parity_spread_ratio=rep.parity_spread_ratio,
                         parity_draws=e.parity_draws)
                ctx.log(f"{name}: {path.name} nodes {rep.nodes_before}->{rep.nodes_after}, {rep.random_nodes} "
                        f"random nodes; torch-vs-ORT over {e.parity_draws} draws: mean within "
                        f"{rep.parity_mean_z:.1f} SE, spread ratio {rep.parity_spread_ratio:.2f}")
            else:
                ctx.log(f"{name}: {path.name} nodes {rep.nodes_before}->{rep.nodes_after}, "
                        f"torch-vs-ORT max|d| {rep.parity_max_abs_diff:.2e}")
            metrics[name] = m
    return StageResult(outputs, metrics)


STAGE = Stage("export", sections=("name", "seed", "export"), inputs=("train", "finetune"), run=run)
