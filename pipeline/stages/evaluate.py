"""Stage ``eval``: test-set robustness of the dense (train), masked (prune) and pruned (surgery, then finetune)
models.

Each model is evaluated with its test-time noise on (the paper's single stochastic pass, plus the softmax averaged
over ``eval.avg_passes`` passes) and with the noise off (the function the exported ONNX graph computes). The
adversarial examples crafted on the deployed models (dense, pruned) are saved so that the ``transfer`` stage can
score the ONNX files on them after export."""
from __future__ import annotations

import io
import time

import numpy as np
import torch

from models import noise_mode

from ..algorithms.robustness import evaluate_model, sanity_checks
from ..catalog.artifacts import DEPLOYED, NOISE_OF_MODE, SOURCES
from ..catalog.attacks import ATTACKS, attack_specs, names
from ..core.files import atomic_write_bytes
from ..run.checkpoints import load_model
from ..run.stage import Stage, StageContext, StageResult
from ..core.errors import UserError
from ..train.setup import data_info, eval_images


def save_examples(path, images: torch.Tensor, examples: dict[str, torch.Tensor]) -> None:
    """Perturbations as float16 (|delta| <= eps, so about 1e-5 absolute error), compressed."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: (v - images).numpy().astype(np.float16) for k, v in examples.items()})
    atomic_write_bytes(path, buf.getvalue())


def run(ctx: StageContext) -> StageResult:
    cfg, e = ctx.cfg, ctx.cfg.eval
    images, labels, _ = eval_images(cfg)
    classes = data_info(cfg).num_classes
    if "apgd_dlr" in e.attacks and classes < 3:
        raise UserError(f"eval.attacks: apgd_dlr needs at least 3 classes (its loss compares the top three "
                        f"logits); {cfg.data.dataset} has {classes}: drop it from eval.attacks")
    noisy = cfg.model.noise_coef > 0
    modes = [m for m in NOISE_OF_MODE if m in e.noise_modes] if noisy else ["noise_off"]
    specs = {mode: attack_specs(e, stochastic=mode != "noise_off") for mode in modes}
    ctx.log(f"{len(images)} test images, models {list(e.models)}, modes {modes}, {e.mode} attacks "
            f"{list(specs[modes[0]])}")
    results, outputs, t_all = {}, {}, time.perf_counter()
    for name in e.models:
        model = load_model(ctx.inputs[SOURCES[name]]["model_weights"], ctx.inputs[SOURCES[name]]["model_arch"])
        results[name] = {}
        for mode in modes:
            if name not in DEPLOYED and mode == "per_sample":
                continue   # a deployment variant: evaluated on the deployed models only
            if name == "masked" and mode == "noise_off" and "pruned" in e.models \
                    and ctx.metrics_of["finetune"].get("epochs", 0) == 0:
                # surgery is exact with the noise off (its max |dlogits| is recorded), so this row equals pruned's
                results[name][mode] = {"same_as": "pruned"}
                continue
            stochastic = mode != "noise_off"
            ctx.log(f"{name}, {mode}")
            t0 = time.perf_counter()
            keep = list(specs[mode]) if name in DEPLOYED else []
            with noise_mode(model, NOISE_OF_MODE[mode]):
                res, kept = evaluate_model(model, images, labels, specs[mode], stochastic=stochastic,
                                           batch_size=e.batch_size, avg_passes=e.avg_passes,
                                           sweep_eps_255=e.sweep_eps_255, sweep_steps=e.sweep_steps,
                                           seed=cfg.seed, log=lambda m, _p=f"{name}/{mode}": ctx.log(f"{_p} {m}"),
                                           keep_examples=keep, cascade=e.mode == "cascade")
            res["seconds"] = round(time.perf_counter() - t0, 1)
            res["sanity"] = sanity_checks(res, stochastic=stochastic, slack_pt=e.sanity_slack_pt,
                                          paper_eps=e.paper_eps_01, strong_eps=e.eps_255 / 255,
                                          strong=names("strong"))
            results[name][mode] = res
            if kept:
                path = ctx.out_dir / f"adv_{name}_{mode}.npz"
                save_examples(path, images, kept)
                outputs[f"adv_{name}_{mode}"] = path
            bad = [c for c in res["sanity"] if not c["ok"]]
            ctx.log(f"{name}/{mode}: natural {res['natural']:.2f}%, worst case {res.get('worst_case', float('nan')):.2f}%"
                    f", {len(bad)} sanity failure(s) in {res['seconds']}s")
    seconds = time.perf_counter() - t_all
    attacked = sum(r.get("images", 0) for m in results.values() for r in m.values())
    metrics = {"images": len(images), "modes": modes, "models": results,
               **({"num_classes": classes} if classes != 10 else {}),
               "attacks": {k: {"key": s.key, "params": s.params} for k, s in specs[modes[0]].items()},
               "mode": e.mode,
               "seconds": round(seconds, 1), "images_per_s": round(attacked / max(seconds, 1e-9), 2)}
    return StageResult(outputs, metrics)


STAGE = Stage("eval", sections=("seed", "data", "model", "eval"), inputs=("train", "prune", "finetune"), run=run,
              tables=(ATTACKS,))
