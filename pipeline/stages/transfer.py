"""Stage ``transfer``: every ONNX artifact (each noise variant, and int8) scored by onnxruntime on the adversarial
examples that the eval stage crafted on the torch models, one row per (artifact, mode the examples were crafted
in). An artifact's *twin* mode is the torch function it computes -- deterministic: noise_off, stochastic:
stochastic, per_sample: per_sample; int8 has none, so its rows are robustness by transfer from its float model.
Deterministic artifacts on their twin's examples must match torch (float rounding at the boundary only); an
artifact scored on examples from another mode is a transfer attack and must not beat white-box noise-off by more
than the slack."""
from __future__ import annotations

import numpy as np
import torch

from ..catalog.artifacts import TWIN, WORST, artifact_path, artifacts
from ..run.stage import Stage, StageContext, StageResult
from ..train.setup import eval_images


def run(ctx: StageContext) -> StageResult:
    from export import ort_predict, ort_session

    cfg, e = ctx.cfg, ctx.cfg.eval
    images, labels, _ = eval_images(cfg)
    y = labels.numpy()
    evaluated = ctx.metrics_of["eval"]["models"]
    results = {}
    for name, (model, variant) in artifacts(ctx.inputs).items():
        if model not in evaluated:
            continue
        session = ort_session(artifact_path(ctx.inputs, name), intra_op_threads=0)
        clean_ok = ort_predict(session, images, e.batch_size).argmax(1) == y
        twin = TWIN[variant]
        rows = {"model": model, "variant": variant, "twin_mode": twin,
                "natural": 100.0 * float(clean_ok.mean()), "crafted_on": {}}
        noise_off = evaluated[model].get("noise_off", {})
        whitebox = dict(noise_off.get("attacks", {}))
        if "worst_case" in noise_off:   # a cascade keeps one set of examples: the worst case's
            whitebox[WORST] = {"accuracy": noise_off["worst_case"]}
        sanity = []
        for mode in ctx.metrics_of["eval"]["modes"]:
            key = f"adv_{model}_{mode}"
            if key not in ctx.inputs["eval"]:
                continue
            with np.load(ctx.inputs["eval"][key]) as deltas:
                accs = {}
                for attack in deltas.files:
                    x_adv = (images + torch.from_numpy(deltas[attack].astype(np.float32))).clamp(0, 1)
                    ok = clean_ok & (ort_predict(session, x_adv, e.batch_size).argmax(1) == y)
                    accs[attack] = 100.0 * float(ok.mean())
                    if attack not in whitebox or variant not in ("deterministic", "int8"):
                        continue
                    wb = whitebox[attack]["accuracy"]
                    if variant == "deterministic" and mode == "noise_off":
                        # same function: equal up to float rounding at the boundary
                        sanity.append({"check": f"onnx_{attack}_matches_torch_noise_off",
                                       "ok": abs(accs[attack] - wb) <= e.sanity_slack_pt,
                                       "detail": f"ONNX {accs[attack]:.2f}% vs torch {wb:.2f}%"})
                    elif variant == "deterministic":
                        sanity.append({"check": f"onnx_{attack}_transfer_not_below_whitebox",
                                       "ok": accs[attack] >= wb - e.sanity_slack_pt,
                                       "detail": f"ONNX on examples from the {mode} model "
                                                 f"{accs[attack]:.2f}% vs white-box noise off {wb:.2f}%"})
            rows["crafted_on"][mode] = accs
            ctx.log(f"{name}.onnx on examples crafted on torch ({mode}): "
                    + ", ".join(f"{k} {v:.2f}%" for k, v in accs.items()))
        rows["sanity"] = sanity
        results[name] = rows
    return StageResult({}, {"images": len(images), "models": results})


STAGE = Stage("transfer", sections=("seed", "data", "eval"), inputs=("eval", "export", "quantize"), run=run)
