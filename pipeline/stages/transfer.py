"""Stage ``transfer``: the exported ONNX files scored by onnxruntime on the adversarial examples that the eval
stage crafted on the torch models (noise off: the same function, so this is a parity check of the robust
numbers; noise on: a transfer attack from the stochastic model). White-box numbers of the deployed function are
the noise-off rows of ``eval``; an ONNX transfer number below them (beyond the slack) is a sanity failure."""
from __future__ import annotations

import numpy as np
import torch

from ..runner import Stage, StageContext, StageResult
from .evaluate import DEPLOYED, eval_images


def run(ctx: StageContext) -> StageResult:
    from export import ort_predict, ort_session

    cfg, e = ctx.cfg, ctx.cfg.eval
    images, labels, _ = eval_images(cfg)
    y = labels.numpy()
    evaluated = ctx.metrics_of["eval"]["models"]
    results = {}
    for name in DEPLOYED:
        if name not in evaluated:
            continue
        session = ort_session(ctx.inputs["export"][f"{name}_onnx"], intra_op_threads=0)
        clean_ok = ort_predict(session, images, e.batch_size).argmax(1) == y
        rows = {"natural": 100.0 * float(clean_ok.mean()), "crafted_on": {}}
        whitebox = evaluated[name].get("noise_off", {}).get("attacks", {})
        sanity = []
        for mode in ctx.metrics_of["eval"]["modes"]:
            key = f"adv_{name}_{mode}"
            if key not in ctx.inputs["eval"]:
                continue
            with np.load(ctx.inputs["eval"][key]) as deltas:
                accs = {}
                for attack in deltas.files:
                    x_adv = (images + torch.from_numpy(deltas[attack].astype(np.float32))).clamp(0, 1)
                    ok = clean_ok & (ort_predict(session, x_adv, e.batch_size).argmax(1) == y)
                    accs[attack] = 100.0 * float(ok.mean())
                    if attack in whitebox:
                        wb = whitebox[attack]["accuracy"]
                        if mode == "noise_off":   # same function: equal up to float rounding at the boundary
                            sanity.append({"check": f"onnx_{attack}_matches_torch_noise_off",
                                           "ok": abs(accs[attack] - wb) <= e.sanity_slack_pt,
                                           "detail": f"ONNX {accs[attack]:.2f}% vs torch {wb:.2f}%"})
                        else:
                            sanity.append({"check": f"onnx_{attack}_transfer_not_below_whitebox",
                                           "ok": accs[attack] >= wb - e.sanity_slack_pt,
                                           "detail": f"ONNX on examples from the stochastic model "
                                                     f"{accs[attack]:.2f}% vs white-box noise off {wb:.2f}%"})
            rows["crafted_on"][mode] = accs
            ctx.log(f"{name}.onnx on examples crafted on torch ({mode}): "
                    + ", ".join(f"{k} {v:.2f}%" for k, v in accs.items()))
        rows["sanity"] = sanity
        results[name] = rows
    return StageResult({}, {"images": len(images), "models": results})


STAGE = Stage("transfer", sections=("seed", "data", "eval"), inputs=("eval", "export"), run=run)
