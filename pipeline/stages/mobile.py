"""Stage ``mobile``: onnxruntime's mobile file format. Every deterministic artifact (export) and every quantized one
(quantize: whichever variants it wrote) as ``<name>.ort`` (export/mobile.py: ``mobile.optimization_level``,
``mobile.optimization_style``, ``mobile.target_platform``), one ``required_operators.config`` for all of them (the
ops a reduced onnxruntime build needs to run them: ``build.sh --include_ops_by_config``), and per file
onnxruntime's verdict on NNAPI and CoreML, checked on the test subset against its .onnx: top-1 agreement and the
largest logit difference. The bench stage times the .ort files beside the .onnx ones.

onnxruntime does not write a .ort file byte for byte the same twice (some tables are serialised in hash order):
the graph is the same, the sha256 is not, so a rerun of this stage reruns bench."""
from __future__ import annotations

import numpy as np

from ..catalog.artifacts import (MOBILE_VARIANTS, REQUIRED_OPERATORS, artifact_path, artifacts, ort_key,
                                 ort_label)
from ..core.errors import UserError
from ..run.stage import Stage, StageContext, StageResult
from ..train.data import to_float
from ..train.setup import data_splits


GRID_VARIANTS = ("br", "admm_q")   # weights as grid codes: int4 when quantize.weight_format says so


def run(ctx: StageContext) -> StageResult:
    from export import ort_predict, ort_session
    from export.mobile import (CONFIG_NAME, OrtConversionError, convert_to_ort, mobile_usability,
                               unstorable_tensors, write_required_operators)

    cfg, m = ctx.cfg, ctx.cfg.mobile
    settings = {"optimization_level": m.optimization_level, "optimization_style": m.optimization_style,
                "target_platform": m.target_platform}
    if not m.enabled:
        ctx.log("mobile.enabled = false: no .ort files")
        return StageResult({}, {"enabled": False})
    arts = {name: mv for name, mv in artifacts(ctx.inputs).items() if mv[1] in MOBILE_VARIANTS}
    sources = {name: artifact_path(ctx.inputs, name) for name in arts}
    outputs, per, skipped = {}, {}, {}
    try:   # every conversion first: a graph onnxruntime cannot convert stops the stage before any data is loaded
        for name, src in sources.items():
            untyped = sorted({t for _, t in unstorable_tensors(src)}) if arts[name][1] in GRID_VARIANTS else []
            if untyped:   # int4 codes (the default for <= 4 bits): the .onnx ships, the .ort format cannot hold them
                skipped[name] = (f"no .ort: onnxruntime's .ort format has no {'/'.join(untyped)} tensors "
                                 '(quantize.weight_format = "int8" stores the same codes as int8)')
                ctx.log(f"{src.name}: {skipped[name]}")
                continue
            dst = ctx.out_dir / ort_label(name)
            per[name] = convert_to_ort(src, dst, **settings)
            outputs[ort_key(name)] = dst
        config = ctx.out_dir / CONFIG_NAME
        if per:
            runtime = list(sources.values()) if m.optimization_style == "runtime" else None
            ops = write_required_operators(list(outputs.values()), config, runtime_sources=runtime,
                                           optimization_level=m.optimization_level,
                                           target_platform=m.target_platform)
    except OrtConversionError as e:
        raise UserError(f"mobile: {e}; mobile.enabled = false goes without .ort files") from None
    _, _, test = data_splits(cfg)
    images = to_float(test.images).numpy()   # the evaluated test set (data.test_subset), as the quantize stage's
    for name, rep in per.items():
        src, dst = sources[name], outputs[ort_key(name)]
        model, variant = arts[name]
        try:
            usable = mobile_usability(src)
        except Exception as e:   # the checker is advice: a graph it cannot read is reported, not a failed run
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            ctx.log(f"{src.name}: onnxruntime's mobile usability checker failed ({why})")
            usable = {"nnapi": "unknown", "coreml": "unknown", "coreml_format": "-", "eps": {},
                      "fixed_shape_needed": {"nnapi": False, "coreml": False},
                      "detail": f"the usability checker failed: {why}"}
        ref = ort_predict(ort_session(src), images)
        got = ort_predict(ort_session(dst), images)
        rep.update(model=model, variant=variant, file=dst.name, onnx=src.name, images=len(images),
                   top1_agreement=100.0 * float((ref.argmax(1) == got.argmax(1)).mean()),
                   max_abs_logit_diff=float(np.abs(ref - got).max()), usability=usable,
                   nnapi=usable["nnapi"], coreml=usable["coreml"])
        ctx.log(f"{dst.name}: {rep['source_bytes'] / 1e3:.0f} kB -> {rep['bytes'] / 1e3:.0f} kB; top-1 agreement "
                f"with {src.name} {rep['top1_agreement']:.1f}% on {len(images)} test images, max |d logits| "
                f"{rep['max_abs_logit_diff']:.2e}; NNAPI {usable['nnapi']}, CoreML {usable['coreml']} "
                f"({usable['coreml_format']})")
    metrics = {"enabled": True, **settings, "artifacts": per, **({"skipped": skipped} if skipped else {})}
    if per:
        outputs[REQUIRED_OPERATORS] = config
        metrics["required_operators"] = {"file": config.name, "ops": ops,
                                         "count": sum(len(o) for d in ops.values() for o in d.values())}
        ctx.log(f"{config.name}: {metrics['required_operators']['count']} op(s) for {len(per)} .ort file(s) "
                f"({', '.join(ops)})")
    return StageResult(outputs, metrics)


STAGE = Stage("mobile", sections=("data", "mobile"), inputs=("export", "quantize"), run=run)
