"""Stage ``qeval``: white-box robustness of every quantized artifact (PTQ int8, QAT int8, Binary-Relax, ADMM grid).

Each graph is attacked through its torch twin (export/qdq_twin.py: the ONNX graph interpreted in torch, rounding
passed straight through -- BPDA), with the eval stage's attack list, sweep and mode (cascade or full) on the same
test images. Beside the eval stage's own sanity checks, a white-box attack must not score above the transfer
attack the ``transfer`` stage ran on the same artifact (examples crafted on its float model) beyond the slack: a
white-box attack weaker than transfer means the gradients through the twin are broken (or the twin is not the
graph). The twin is also checked against onnxruntime on the clean images (top-1 agreement)."""
from __future__ import annotations

import time

import torch

from ..algorithms.robustness import evaluate_model, sanity_checks
from ..catalog.artifacts import QUANTIZED, WORST, artifact_path, artifacts
from ..catalog.attacks import ATTACKS, attack_specs, names
from ..run.stage import Stage, StageContext, StageResult
from ..train.setup import eval_images


def whitebox_vs_transfer(res: dict, transferred: dict, slack_pt: float) -> list[dict]:
    """One check per attack scored both ways: white-box accuracy <= transfer accuracy + slack."""
    checks = []
    white = {k: v["accuracy"] for k, v in res.get("attacks", {}).items()}
    if "worst_case" in res:
        white[WORST] = res["worst_case"]
    for attack, acc in transferred.items():
        if attack in white:
            checks.append({"check": f"whitebox_{attack}_not_above_transfer",
                           "ok": white[attack] <= acc + slack_pt,
                           "detail": f"white-box {white[attack]:.2f}% vs transfer {acc:.2f}%"})
    return checks


def run(ctx: StageContext) -> StageResult:
    import onnx

    from export import ort_predict, ort_session
    from export.qdq_twin import QDQTwin, UnsupportedOp

    cfg, e = ctx.cfg, ctx.cfg.eval
    images, labels, _ = eval_images(cfg)
    specs = attack_specs(e, stochastic=False)
    transfer = ctx.metrics_of["transfer"].get("models", {})
    results, t_all = {}, time.perf_counter()
    for name, (model, variant) in artifacts(ctx.inputs).items():
        if variant not in QUANTIZED or model not in e.models:
            continue
        path = artifact_path(ctx.inputs, name)
        try:
            twin = QDQTwin(onnx.load(str(path))).eval()
        except UnsupportedOp as err:
            results[name] = {"model": model, "variant": variant, "skipped": str(err),
                             "sanity": [{"check": "whitebox_twin_available", "ok": False, "detail": str(err)}]}
            ctx.log(f"{name}: not attacked white-box: {err}")
            continue
        with torch.no_grad():
            twin_pred = torch.cat([twin(images[i:i + e.batch_size]) for i in range(0, len(images), e.batch_size)])
        ort_pred = ort_predict(ort_session(path), images, e.batch_size)
        agreement = 100.0 * float((twin_pred.argmax(1).numpy() == ort_pred.argmax(1)).mean())
        ctx.log(f"{name}: white-box through its torch twin (top-1 agreement with onnxruntime {agreement:.1f}%)")
        t0 = time.perf_counter()
        res, _ = evaluate_model(twin, images, labels, specs, stochastic=False, batch_size=e.batch_size,
                                avg_passes=e.avg_passes, sweep_eps_255=e.sweep_eps_255, sweep_steps=e.sweep_steps,
                                seed=cfg.seed, log=lambda m, _p=name: ctx.log(f"{_p} {m}"),
                                cascade=e.mode == "cascade")
        res["seconds"] = round(time.perf_counter() - t0, 1)
        res["sanity"] = sanity_checks(res, stochastic=False, slack_pt=e.sanity_slack_pt, paper_eps=e.paper_eps_01,
                                      strong_eps=e.eps_255 / 255, strong=names("strong"))
        transferred = transfer.get(name, {}).get("crafted_on", {}).get("noise_off", {})
        res["sanity"] += whitebox_vs_transfer(res, transferred, e.sanity_slack_pt)
        res["sanity"].append({"check": "twin_agrees_with_onnxruntime", "ok": agreement >= 99.0,
                              "detail": f"top-1 agreement {agreement:.2f}% on {len(images)} clean images"})
        res.update(model=model, variant=variant, twin_top1_agreement=agreement,
                   transfer=transferred, natural_onnx=100.0 * float((ort_pred.argmax(1) == labels.numpy()).mean()))
        results[name] = res
        bad = [c for c in res["sanity"] if not c["ok"]]
        ctx.log(f"{name}: natural {res['natural']:.2f}%, worst case {res.get('worst_case', float('nan')):.2f}%, "
                f"{len(bad)} sanity failure(s) in {res['seconds']}s")
    seconds = time.perf_counter() - t_all
    return StageResult({}, {"images": len(images), "models": results, "mode": e.mode,
                            "attacks": list(specs), "seconds": round(seconds, 1)})


STAGE = Stage("qeval", sections=("seed", "data", "eval"), inputs=("eval", "export", "quantize", "transfer"),
              run=run, tables=(ATTACKS,))
