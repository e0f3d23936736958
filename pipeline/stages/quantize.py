"""Stage ``quantize``: int8 (QDQ) versions of the deterministic dense and pruned graphs, calibrated on seeded
training images; checked on the test subset against their float graphs (top-1 agreement, accuracy change)."""
from __future__ import annotations

import numpy as np

from ..catalog.artifacts import DEPLOYED, artifact_name, output_key
from ..core import seeds
from ..run.stage import Stage, StageContext, StageResult
from ..train.data import to_float
from ..train.setup import data_splits


def run(ctx: StageContext) -> StageResult:
    from export import ort_predict, ort_session
    from export.quantize import quantize_int8

    cfg, q = ctx.cfg, ctx.cfg.quantize
    if not q.enabled:
        ctx.log("quantize.enabled = false: no int8 artifacts")
        return StageResult({}, {"enabled": False})
    train, _, test = data_splits(cfg)
    calib = to_float(train.subset(q.calibration_images, cfg.data.split_seed + seeds.CALIBRATION).images).numpy()
    images, labels = to_float(test.images).numpy(), test.labels.numpy()   # the evaluated test set (data.test_subset)
    outputs, metrics = {}, {"enabled": True}
    for model in DEPLOYED:
        name = artifact_name(model, "int8")
        src = ctx.inputs["export"][output_key(artifact_name(model, "deterministic"))]
        dst = ctx.out_dir / f"{name}.onnx"
        rep = quantize_int8(src, dst, calib, per_channel=q.per_channel, method=q.method, op_types=q.op_types)
        f32 = ort_predict(ort_session(src), images)
        i8 = ort_predict(ort_session(dst), images)
        rep.update(images=len(images),
                   float_accuracy=100.0 * float((f32.argmax(1) == labels).mean()),
                   int8_accuracy=100.0 * float((i8.argmax(1) == labels).mean()),
                   top1_agreement=100.0 * float((f32.argmax(1) == i8.argmax(1)).mean()),
                   max_abs_logit_diff=float(np.abs(f32 - i8).max()))
        ctx.log(f"{name}: {rep['source_bytes'] / 1e3:.0f} kB -> {rep['bytes'] / 1e3:.0f} kB, accuracy "
                f"{rep['float_accuracy']:.2f}% -> {rep['int8_accuracy']:.2f}% on {len(images)} test images, "
                f"top-1 agreement {rep['top1_agreement']:.1f}%")
        outputs[output_key(name)] = dst
        metrics[name] = rep
    return StageResult(outputs, metrics)


STAGE = Stage("quantize", sections=("seed", "data", "quantize"), inputs=("export",), run=run)
