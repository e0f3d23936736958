"""Stage ``quantize``: quantized versions of the deterministic dense and pruned graphs.

- Always: onnxruntime's static int8 (QDQ: per-channel symmetric int8 weights, uint8 activations calibrated on
  seeded training images) of every deployed graph: ``<model>_int8.onnx`` (PTQ).
- ``quantize.method = "qat"``: quantization-aware adversarial training of that int8 graph itself. Its torch twin
  (export/qdq_twin.py) holds float weights that it fake-quantizes exactly as onnxruntime quantizes weights, keeps
  the calibrated activation ranges, and passes gradients straight through the rounding; after training the int8
  codes are written back into the graph: ``<model>_qat_int8.onnx`` -- the function the twin computed.
- ``"binary_relax"``: Binary-Relax (paper README §5) on the torch model: every conv weight's forward/backward value is
  (eta·Q(w) + w)/(1 + eta) for ``relax_epochs`` epochs (eta ×1.05 per epoch), then Q(w); straight-through gradients;
  the trade-off loss CE(x) + 8·CE(x_adv); the final weights Q(w). Where we differ from §5's code: the 1×1 shortcut
  convs are quantized too (every conv: what ships is then all-grid), the classifier and BN stay float as there, and
  training starts from the adversarially trained model rather than from scratch. Exported noise-off with its codes
  in the file (export/grid.py): ``<model>_br.onnx``, activations float.
- ``"admm"``: the weights ADMM's joint projection left on the grid (prune.admm.bits), exported the same way:
  ``pruned_admm_q.onnx``.

Each quantized graph is checked on the evaluated test images against its float graph (accuracy, top-1 agreement)
and against its torch twin (max |dlogits|, in units of the graph's last quantization step where it has one)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch

from ..catalog.artifacts import DEPLOYED, SOURCES, artifact_name, output_key
from ..core import seeds
from ..core.errors import UserError
from ..run.stage import Stage, StageContext, StageResult
from ..train.data import to_float
from ..train.setup import data_splits, device_of, seed_everything, validation_split

VARIANT_OF_METHOD = {"qat": "qat_int8", "binary_relax": "br", "admm": "admm_q"}
QUANTIZE_SEED = 7   # offset of the quantize stage's training streams from cfg.seed


def _accuracy_report(f32: np.ndarray, dst, images, labels) -> dict:
    """The quantized graph ``dst`` against its float graph's logits ``f32`` on the same images."""
    from export import ort_predict, ort_session

    q = ort_predict(ort_session(dst), images)
    return {"images": len(images),
            "float_accuracy": 100.0 * float((f32.argmax(1) == labels).mean()),
            "quantized_accuracy": 100.0 * float((q.argmax(1) == labels).mean()),
            "top1_agreement": 100.0 * float((f32.argmax(1) == q.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(f32 - q).max())}


def output_step(proto) -> float | None:
    """The quantization step of the graph's logits: the scale of the DequantizeLinear that produces them, or --
    behind an ensemble's mean (Div / Mul by a constant) -- that step divided likewise. None without one."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    node, factor = producer.get(proto.graph.output[0].name), 1.0
    while node is not None and node.op_type in ("Div", "Mul") and node.input[1] in inits:
        c = float(np.abs(inits[node.input[1]]).max())
        factor = factor / c if node.op_type == "Div" else factor * c
        node = producer.get(node.input[0])
    if node is not None and node.op_type == "DequantizeLinear" and node.input[1] in inits:
        return float(inits[node.input[1]].max()) * factor
    return None


def twin_parity(path, images: torch.Tensor) -> dict:
    """onnxruntime against the torch twin of the same file, on ``images``."""
    import onnx

    from export import ort_predict, ort_session
    from export.qdq_twin import QDQTwin

    proto = onnx.load(str(path))
    twin = QDQTwin(proto).eval()
    with torch.no_grad():
        t = torch.cat([twin(images[i:i + 256]) for i in range(0, len(images), 256)]).numpy()
    o = ort_predict(ort_session(path), images)
    diff = float(np.abs(t - o).max())
    step = output_step(proto)
    return {"twin_max_abs_diff": diff, "twin_top1_agreement": 100.0 * float((t.argmax(1) == o.argmax(1)).mean()),
            **({"output_step": step, "twin_diff_steps": diff / step} if step else {})}


def _sub_context(ctx: StageContext, model: str) -> StageContext:
    """The stage's context for one trained model: its own subfolder and its own resume checkpoint."""
    out = ctx.out_dir / model
    out.mkdir(exist_ok=True)
    resume = ctx.resume_dir / model if ctx.resume_dir is not None else None
    if resume is not None:
        resume.mkdir(parents=True, exist_ok=True)
    return dataclasses.replace(ctx, out_dir=out, resume_dir=resume,
                               log=lambda m, _p=f"{model}: ": ctx.log(_p + m))


def _train(ctx, model, *, name: str, sparsifier=None, validation_context=None):
    """Adversarial training of ``model`` for quantize.epochs with the train section's recipe (attack, optimizer,
    batch) and quantize's loss weights; resumable; the last epoch's weights are kept (no selection)."""
    from ..train import resume
    from ..train.recipe import Schedule, fit

    cfg, q = ctx.cfg, ctx.cfg.quantize
    generator = seed_everything(cfg.seed + QUANTIZE_SEED)
    train, val, _ = data_splits(cfg)
    state = resume.load(ctx.resume_dir)
    if state is not None:
        model.load_state_dict(state["model"])
    fitted = fit(ctx, model, model, name=name, seed=cfg.seed + QUANTIZE_SEED, generator=generator, train=train,
                 val=validation_split(cfg, val), device=device_of(cfg), world=None, state=state,
                 sparsifier=sparsifier, schedule=Schedule(q.epochs, q.lr, q.lr_milestones, 0.1),
                 loss_weights=(q.natural_weight, q.adversarial_weight), validation_context=validation_context)
    return json.loads(fitted.log_lines[-1])


def _qat(ctx, model_name: str, ptq_path, dst) -> dict:
    import onnx

    from export.qdq_twin import QDQTwin
    from ..core.files import naming

    proto = onnx.load(str(ptq_path))
    try:
        twin = QDQTwin(proto, trainable=True).to(device_of(ctx.cfg))
    except ValueError as e:   # UnsupportedOp
        raise UserError(f"quantize.method = \"qat\": {ptq_path.name}: {e}") from None
    n = sum(p.numel() for p in twin.parameters())
    ctx.log(f"QAT of {ptq_path.name}: {len(twin.weights)} int8 weight tensors + {len(twin.biases)} int32 biases "
            f"({n} float parameters) through the torch twin, activation ranges as calibrated")
    last = _train(ctx, twin, name=f"qat {model_name}")
    twin.cpu().write_back(proto)
    onnx.checker.check_model(proto, full_check=True)
    with naming(dst):
        tmp = dst.with_name(f".{dst.name}.tmp")
        onnx.save(proto, str(tmp))
        tmp.replace(dst)
    return {"trained_epochs": ctx.cfg.quantize.epochs,
            "last_epoch": {k: last[k] for k in ("loss", "val_natural", "val_robust") if k in last}}


def _conv_weights(model) -> list[torch.nn.Parameter]:
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def _grid_export(ctx, model, model_name: str, bits: int, dst) -> dict:
    """Export the model (noise off) and rewrite its conv weights as codes on the ``bits`` grid."""
    import tempfile
    from pathlib import Path

    from export import export_onnx
    from export.grid import write_grid_graph
    from ..algorithms.quantizers import codes, codes_on_grid
    from ..train.setup import image_shape

    cfg, q = ctx.cfg, ctx.cfg.quantize
    model = model.cpu().eval()
    pairs, projected = [], 0
    with torch.no_grad():
        for w in _conv_weights(model):
            pair = codes_on_grid(w, bits)   # Binary-Relax's and ADMM's final weights: read back as they are
            if pair is None:   # moved off the grid (ADMM, then fine-tuning): the hard projection
                pair, projected = codes(w, bits), projected + 1
            c, s = pair
            w.copy_(c.float() * (s.reshape([-1] + [1] * (w.dim() - 1)) if s.dim() else s))
            pairs.append(pair)
    if projected:
        ctx.log(f"{projected} conv weight(s) were off the {bits}-bit grid (fine-tuned after pruning?): projected")
    int4 = q.weight_format == "int4" or (q.weight_format == "auto" and bits <= 4)
    shape = image_shape(cfg)
    parity = torch.rand(8, *shape, generator=torch.Generator().manual_seed(cfg.seed))
    with tempfile.TemporaryDirectory() as work:
        float_path = Path(work) / "float.onnx"
        rep = export_onnx(model, float_path, opset=cfg.export.opset, dynamo=cfg.export.dynamo,
                          simplify=cfg.export.simplify, parity_inputs=parity, parity_tol=cfg.export.parity_tol,
                          noise="off", image_shape=shape,
                          metadata={"variant": model_name, "quantized": f"{bits}-bit weight grid"})
        out = write_grid_graph(float_path, dst, [c.numpy() for c, _ in pairs], int4=int4)
        out["float_parity_max_abs_diff"] = rep.parity_max_abs_diff
        from export import ort_predict, ort_session

        a, b = ort_predict(ort_session(float_path), parity), ort_predict(ort_session(dst), parity)
        out["grid_vs_float_max_abs_diff"] = float(np.abs(a - b).max())
    zeros = sum(int((c == 0).sum()) for c, _ in pairs)
    total = sum(c.numel() for c, _ in pairs)
    out.update(bits=bits, grid_sparsity=100.0 * zeros / max(total, 1), projected_onto_grid=projected)
    return out


def _binary_relax(ctx, model_name: str, dst) -> dict:
    from ..algorithms.binary_relax import BinaryRelax
    from ..run.checkpoints import load_model

    cfg, q = ctx.cfg, ctx.cfg.quantize
    src = ctx.inputs[SOURCES[model_name]]
    model = load_model(src["model_weights"], src["model_arch"], device_of(cfg))
    relax = BinaryRelax(_conv_weights(model), bits=q.bits, relax_epochs=q.relax_epochs, eta0=q.eta0,
                        eta_growth=q.eta_growth)
    ctx.log(relax.describe())
    last = _train(ctx, model, name=f"binary-relax {model_name}", sparsifier=relax,
                  validation_context=relax.quantized)
    out = _grid_export(ctx, model, model_name, q.bits, dst)
    out.update(trained_epochs=q.epochs,
               last_epoch={k: last[k] for k in ("loss", "val_natural", "val_robust") if k in last})
    return out


def _admm(ctx, model_name: str, dst) -> dict:
    from ..run.checkpoints import load_model

    src = ctx.inputs[SOURCES[model_name]]
    model = load_model(src["model_weights"], src["model_arch"])
    return _grid_export(ctx, model, model_name, ctx.cfg.quantize.bits, dst)


def run(ctx: StageContext) -> StageResult:
    from export import ort_predict, ort_session
    from export.quantize import quantize_int8

    cfg, q = ctx.cfg, ctx.cfg.quantize
    if not q.enabled:
        ctx.log("quantize.enabled = false: no quantized artifacts")
        return StageResult({}, {"enabled": False})
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train, _, test = data_splits(cfg)
    calib = to_float(train.subset(q.calibration_images, cfg.data.split_seed + seeds.CALIBRATION).images).numpy()
    images, labels = to_float(test.images).numpy(), test.labels.numpy()   # the evaluated test set (data.test_subset)
    outputs, metrics = {}, {"enabled": True, "method": q.method, "bits": q.bits}
    for model in DEPLOYED:
        name = artifact_name(model, "int8")
        src = ctx.inputs["export"][output_key(artifact_name(model, "deterministic"))]
        dst = ctx.out_dir / f"{name}.onnx"
        rep = quantize_int8(src, dst, calib, per_channel=q.per_channel, method=q.calibration, op_types=q.op_types)
        f32 = ort_predict(ort_session(src), images)   # the float graph, once for every quantized version of it
        rep.update(_accuracy_report(f32, dst, images, labels), method="ptq", bits=8)
        rep.update(twin_parity(dst, torch.from_numpy(images[:256])))
        rep["int8_accuracy"] = rep["quantized_accuracy"]
        ctx.log(f"{name}: {rep['source_bytes'] / 1e3:.0f} kB -> {rep['bytes'] / 1e3:.0f} kB, accuracy "
                f"{rep['float_accuracy']:.2f}% -> {rep['int8_accuracy']:.2f}% on {len(images)} test images, "
                f"top-1 agreement {rep['top1_agreement']:.1f}%, torch twin max|d| {rep['twin_max_abs_diff']:.2e}")
        outputs[output_key(name)] = dst
        metrics[name] = rep
        if q.method == "ptq" or model not in q.models:
            continue
        if q.method == "admm" and model != "pruned":
            ctx.log(f"{model}: not ADMM-projected (only the pruned model is): no {model}_admm_q")
            continue
        variant = VARIANT_OF_METHOD[q.method]
        qname = artifact_name(model, variant)
        qdst = ctx.out_dir / f"{qname}.onnx"
        sub = _sub_context(ctx, model)
        if q.method == "qat":
            rep = _qat(sub, model, dst, qdst)
        elif q.method == "binary_relax":
            rep = _binary_relax(sub, model, qdst)
        else:
            rep = _admm(sub, model, qdst)
        rep.update(_accuracy_report(f32, qdst, images, labels), method=q.method, bits=q.bits,
                   bytes=qdst.stat().st_size, source_bytes=src.stat().st_size)
        rep.update(twin_parity(qdst, torch.from_numpy(images[:256])))
        ctx.log(f"{qname}: {rep['bytes'] / 1e3:.0f} kB, accuracy {rep['float_accuracy']:.2f}% (float) -> "
                f"{rep['quantized_accuracy']:.2f}% on {len(images)} test images, torch twin max|d| "
                f"{rep['twin_max_abs_diff']:.2e}")
        outputs[output_key(qname)] = qdst
        metrics[qname] = rep
    return StageResult(outputs, metrics)


STAGE = Stage("quantize", sections=("seed", "data", "train", "quantize"), inputs=("export", "train", "finetune"),
              run=run)
