"""Export an eval-mode model to a single checked, simplified ONNX file, atomically -- noise-free (``noise="off"``)
or with EnResNet's test-time noise in the graph (``"batch"``: std over the whole tensor, as trained;
``"per_sample"``: std per image). A stochastic graph cannot be compared output for output, so its parity check is
statistical: per-image mean and spread of the logits over repeated draws, torch vs onnxruntime."""
from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass

import numpy as np
import torch

from models import noise_mode

from .ort_runtime import float_initializer_count, ort_predict, ort_session

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
IMAGE_SHAPE = (3, 32, 32)


class ExportParityError(RuntimeError):
    def __init__(self, max_abs_diff: float, tol: float):
        super().__init__(f"ONNX Runtime vs torch max |diff| = {max_abs_diff:.3e} exceeds tolerance {tol:.3e}")
        self.max_abs_diff = max_abs_diff
        self.tol = tol


@dataclass(frozen=True)
class ExportReport:
    path: str
    opset: int
    simplified: bool
    nodes_before: int
    nodes_after: int
    parity_max_abs_diff: float  # torch (noise off) vs ORT on the saved file
    params: int  # float elements in the ONNX initializers
    noise: str = "off"
    random_nodes: int = 0   # RandomNormal(Like) nodes in the saved graph
    # stochastic graphs: worst per-logit |mean_ort - mean_torch| in units of its standard error, and the
    # ratio of the logits' spread (ORT / torch) over the draws
    parity_mean_z: float | None = None
    parity_spread_ratio: float | None = None


def _validated_metadata(metadata) -> dict[str, str]:
    metadata = dict(metadata or {})
    bad = {k: type(v).__name__ for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))}
    if bad:
        raise ValueError(f"ONNX metadata must map str to str; offending keys and value types: {bad}")
    return metadata


@contextlib.contextmanager
def _export_mode(model: torch.nn.Module, noise: str = "off"):
    # Per-module flags, not model.training: callers may keep e.g. some BatchNorm layers deliberately frozen.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with noise_mode(model, noise):
            yield model
    finally:
        for m, training in modes:
            m.training = training


def _torch_export(model, example: torch.Tensor, f: str, *, opset: int, dynamo: bool) -> None:
    common = dict(
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamo=dynamo,
        external_data=False,  # one self-contained file, so the atomic os.replace covers everything
        export_params=True,
        keep_initializers_as_inputs=False,  # weights as inputs would block constant folding / BN fusion
        verbose=False,
    )
    if dynamo:
        torch.onnx.export(
            model, (example,), f, **common,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            dynamic_axes=None,
            custom_translation_table=None,
            optimize=True,
            verify=False,  # our own ORT parity check on the final file is stricter
            report=False,
            profile=False,
            dump_exported_program=False,
        )
    else:
        torch.onnx.export(
            model, (example,), f, **common,
            dynamic_shapes=None,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            training=torch.onnx.TrainingMode.EVAL,
            do_constant_folding=True,
            operator_export_type=torch.onnx.OperatorExportTypes.ONNX,
        )


def _simplify(proto):
    import inspect

    import onnxsim

    options = dict(
        check_n=0,  # parity is checked on the final file with the real inputs instead
        perform_optimization=True,
        skip_fuse_bn=False,
        skip_constant_folding=False,
        skip_shape_inference=False,
        include_subgraph=False,
        mutable_initializer=False,
    )
    # onnxsim >= 0.8 only; pyproject still allows 0.4.x, whose simplify() would reject these names.
    newer = dict(
        inline_functions=True,
        initializers_as_constants=True,  # weights are frozen for deployment: let BN fold into them
        target_opset_version=None,  # keep the opset the caller asked for
        providers=["CPUExecutionProvider"],
        gemm_fusion_backend="ort_cpu",
        # Opt-in analyses off: slow (Z3) and they write their own metadata_props entries.
        certify=False,
        check_hazards=False,
        check_gradients=False,
        range_opt=False,
    )
    accepted = inspect.signature(onnxsim.simplify).parameters
    options.update({k: v for k, v in newer.items() if k in accepted})
    simplified, ok = onnxsim.simplify(proto, **options)
    if not ok:
        raise RuntimeError("onnxsim reported that the simplified model could not be validated")
    return simplified


def _random_nodes(proto) -> list:
    return [n for n in proto.graph.node if n.op_type in ("RandomNormal", "RandomNormalLike", "RandomUniform",
                                                          "RandomUniformLike")]


def stochastic_parity(model, session, inputs: torch.Tensor, draws: int, seed: int = 0) -> tuple[float, float]:
    """Worst |mean difference| / standard error over every logit, and the ratio of mean spreads (ORT / torch),
    from ``draws`` noisy passes of each on the same images (the model must be in its noise mode already)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        t = np.stack([model(inputs).float().cpu().numpy() for _ in range(draws)])
    x = inputs.cpu().numpy()
    name = session.get_inputs()[0].name
    o = np.stack([session.run(None, {name: x})[0] for _ in range(draws)])
    se = np.sqrt(t.var(0, ddof=1) / draws + o.var(0, ddof=1) / draws) + 1e-6
    z = float(np.max(np.abs(t.mean(0) - o.mean(0)) / se))
    spread = float(o.std(0, ddof=1).mean() / max(t.std(0, ddof=1).mean(), 1e-12))
    return z, spread


def export_onnx(model: torch.nn.Module, path, *, opset: int = 18, dynamo: bool = True, simplify: bool = True,
                metadata: dict[str, str] | None = None, parity_inputs: torch.Tensor | None = None,
                parity_tol: float = 1e-4, noise: str = "off", parity_draws: int = 200,
                parity_max_z: float = 6.0, image_shape: tuple[int, int, int] = IMAGE_SHAPE) -> ExportReport:
    """``noise != "off"``: the graph must hold one seedless random node per noise site, its logits' per-image
    mean must agree with torch's within ``parity_max_z`` standard errors and their spread within a factor 1.5."""
    import onnx

    metadata = _validated_metadata(metadata)
    path = os.path.abspath(os.fspath(path))
    device = next(model.parameters()).device
    # Batch 2, not 1: torch.export specialises size-1 dims, which would defeat the dynamic batch.
    example = torch.rand((2, *image_shape), generator=torch.Generator().manual_seed(1234)).to(device)
    if parity_inputs is None:
        parity_inputs = torch.rand((8, *image_shape), generator=torch.Generator().manual_seed(0))
    parity_inputs = parity_inputs.detach().float().cpu()

    # Same directory, so os.replace is a rename on one filesystem (atomic), never a copy.
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with _export_mode(model, noise), torch.no_grad():
            _torch_export(model, example, tmp, opset=opset, dynamo=dynamo)
            if noise == "off":
                expected = model(parity_inputs.to(device)).float().cpu().numpy()
        proto = onnx.load(tmp)
        onnx.checker.check_model(proto, full_check=True)
        nodes_before = len(proto.graph.node)
        if simplify:
            proto = _simplify(proto)
            onnx.checker.check_model(proto, full_check=True)
        # Replace, not merge: onnxsim records its own bookkeeping (removed-node lists...) there, and the
        # deployed file should carry exactly the caller's provenance.
        onnx.helper.set_model_props(proto, metadata)
        onnx.save_model(proto, tmp, save_as_external_data=False)

        session = ort_session(tmp, intra_op_threads=1, inter_op_threads=1, optimization="all")
        random_nodes = _random_nodes(proto)
        z = spread = None
        if noise == "off":
            got = ort_predict(session, parity_inputs.numpy(), batch_size=len(parity_inputs))
            diff = float(np.max(np.abs(got - expected)))
            if not diff <= parity_tol:  # `not <=` so that NaN fails too
                raise ExportParityError(diff, parity_tol)
        else:
            sites = sum(1 for m in model.modules() if getattr(m, "coef", 0.0) > 0 and hasattr(m, "per_sample"))
            seeded = [n.name for n in random_nodes if any(a.name == "seed" for a in n.attribute)]
            if len(random_nodes) != sites or seeded:
                raise RuntimeError(f"stochastic export: {len(random_nodes)} random nodes for {sites} noise sites"
                                   + (f", seeded (reproducible, so predictable): {seeded}" if seeded else ""))
            with _export_mode(model, noise):
                z, spread = stochastic_parity(model, session, parity_inputs.to(device), parity_draws)
            diff = float("nan")
            if not (z <= parity_max_z and 1 / 1.5 <= spread <= 1.5):
                raise RuntimeError(f"stochastic export ({noise}): ORT vs torch logits differ in distribution: "
                                   f"mean difference {z:.1f} standard errors (limit {parity_max_z}), spread "
                                   f"ratio {spread:.2f} (limit 1/1.5..1.5)")
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = path   # a full disk's write error names no file
        raise
    # What the file really declares (an exporter may move the opset), not what was asked for.
    file_opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=opset)
    return ExportReport(path=path, opset=file_opset, simplified=simplify, nodes_before=nodes_before,
                        nodes_after=len(proto.graph.node), parity_max_abs_diff=diff,
                        params=float_initializer_count(proto), noise=noise, random_nodes=len(random_nodes),
                        parity_mean_z=z, parity_spread_ratio=spread)
