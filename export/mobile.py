"""onnxruntime's mobile file format: an ONNX graph as a ``.ort`` file (the flatbuffer format that onnxruntime's
minimal and mobile builds load), the ``required_operators.config`` that builds a reduced onnxruntime for a set of
them, and onnxruntime's verdict on how much of a graph NNAPI (Android) and CoreML (iOS) could run.

- :func:`convert_to_ort` does what ``python -m onnxruntime.tools.convert_onnx_models_to_ort`` does for one file
  and one optimization style (``tools/convert_onnx_models_to_ort.py: _convert``): an onnxruntime session at the given
  graph optimization level saves the optimized graph in ORT format; for a target platform other than ``amd64`` the
  NCHWc layout transformer is off (its kernels exist on x86 only) and ``session.qdqisint8allowed`` follows the
  platform (``arm``: 1). Every option is explicit here; the tool reads its level from an environment variable.
- :func:`write_required_operators`: the tool's ``create_config_from_models`` on the ``.ort`` files (for the
  ``runtime`` style also on their conversions without saved runtime optimizations, as the tool does), with the
  files named by their base names so that the config does not depend on where it was written.
- :func:`mobile_usability`: ``onnxruntime.tools.mobile_helpers.usability_checker`` as data: the partitions NNAPI,
  CoreML NeuralNetwork and CoreML MLProgram would take, as the graph is and with a fixed input shape.

onnx / onnxruntime are imported inside functions so that importing ``export`` stays cheap.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import uuid
from pathlib import Path

STYLES = ("fixed", "runtime")
LEVELS = ("disable", "basic", "extended", "layout", "all")   # onnxruntime.tools.onnx_model_utils.get_optimization_level
PLATFORMS = ("arm", "amd64")
CONFIG_NAME = "required_operators.config"
# usability_checker.PartitioningInfo.TryWithEP -> our words
VERDICTS = {"YES": "supported", "MAYBE": "partial", "NO": "unsupported"}
_RANK = {"unsupported": 0, "partial": 1, "supported": 2}


class OrtConversionError(ValueError):
    """onnxruntime cannot load (and so cannot convert) a graph; the message is one line naming the file and the op."""


def _session_options(ort, level: str, dst: str, *, target_platform: str, minimal: str | None):
    from onnxruntime.tools.onnx_model_utils import get_optimization_level

    so = ort.SessionOptions()
    so.optimized_model_filepath = dst
    so.graph_optimization_level = get_optimization_level(level)
    so.log_severity_level = 3   # errors only: the warnings (e.g. unused initializers removed) are no one's business
    so.add_session_config_entry("session.save_model_format", "ORT")
    so.add_session_config_entry("session.qdqisint8allowed", "1" if target_platform == "arm" else "0")
    if minimal is not None:     # "save": record runtime optimizations; "apply": only those a minimal build can replay
        so.add_session_config_entry("optimization.minimal_build_optimizations", minimal)
    return so


def _disabled_optimizers(level: str, target_platform: str) -> list[str] | None:
    # as the tool: the NCHWc layout makes an x86-only graph, so it is off unless the target is amd64
    return ["NchwcTransformer"] if level in ("layout", "all") and target_platform != "amd64" else None


def _check(optimization_level: str, optimization_style: str, target_platform: str) -> None:
    for value, allowed, what in ((optimization_level, LEVELS, "optimization_level"),
                                 (optimization_style, STYLES, "optimization_style"),
                                 (target_platform, PLATFORMS, "target_platform")):
        if value not in allowed:
            raise ValueError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")


def _save(src, dst, *, optimization_level: str, target_platform: str, minimal: str | None) -> None:
    """One conversion, written atomically: a temp file in ``dst``'s folder, renamed over ``dst``."""
    import onnxruntime as ort

    dst = os.path.abspath(os.fspath(dst))
    tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.{uuid.uuid4().hex}.tmp")
    so = _session_options(ort, optimization_level, tmp, target_platform=target_platform, minimal=minimal)
    try:
        try:
            ort.InferenceSession(os.fspath(src), sess_options=so, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=_disabled_optimizers(optimization_level, target_platform))
        except Exception as e:   # onnxruntime's pybind errors (Fail, InvalidGraph, NotImplemented...) derive Exception
            raise OrtConversionError(_why(src, e)) from None
        if not os.path.isfile(tmp):
            raise OrtConversionError(f"{Path(src).name}: onnxruntime wrote no .ort file")
        # onnxruntime saves some graphs it cannot read back as .ort (see _ORT_TYPES): load it once before it counts
        check = ort.SessionOptions()
        check.log_severity_level = 3
        check.add_session_config_entry("session.load_model_format", "ORT")
        try:
            ort.InferenceSession(tmp, sess_options=check, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise OrtConversionError(f"{Path(src).name}: cannot convert to .ort: onnxruntime wrote a .ort file it "
                                     f"cannot load ({_ort_message(e)})") from None
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def convert_to_ort(src, dst, *, optimization_level: str = "all", optimization_style: str = "fixed",
                   target_platform: str = "arm") -> dict:
    """Write ``src`` (.onnx) as ``dst`` (.ort) atomically; returns what was done. ``optimization_style`` ``"fixed"``
    bakes every optimization of ``optimization_level`` into the file; ``"runtime"`` applies the basic ones and saves
    the others to be replayed at load time (``session.enable_saved_runtime_optimizations``), for NNAPI / CoreML,
    which take nodes before those optimizations would fuse them. Raises :class:`OrtConversionError` (one line)
    for a graph onnxruntime cannot load, e.g. an op it has no kernel for."""
    _check(optimization_level, optimization_style, target_platform)
    untyped = unstorable_tensors(src)
    if untyped:
        more = f", and {len(untyped) - 1} more input(s)" if len(untyped) > 1 else ""
        raise OrtConversionError(f"{Path(src).name}: cannot convert to .ort: onnxruntime's .ort format has no "
                                 f"{'/'.join(sorted({t for _, t in untyped}))} tensors: op {untyped[0][0]}{more}")
    _save(src, dst, optimization_level=optimization_level, target_platform=target_platform,
          minimal="save" if optimization_style == "runtime" else None)
    return {"bytes": os.path.getsize(dst), "source_bytes": os.path.getsize(src),
            "optimization_level": optimization_level, "optimization_style": optimization_style,
            "target_platform": target_platform}


def _ort_types() -> set[int]:
    """The tensor element types the .ort format can hold: its flatbuffer schema's TensorDataType (onnx's numbering;
    onnxruntime 1.32: up to FLOAT8E5M2FNUZ, so no INT4 / UINT4 / FLOAT4E2M1, which onnxruntime saves but cannot
    load back)."""
    from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.TensorDataType import TensorDataType

    return {v for k, v in vars(TensorDataType).items() if not k.startswith("_") and isinstance(v, int)}


def unstorable_tensors(src) -> list[tuple[str, str]]:
    """(``op (node 'name') reads 'tensor'``, type name) for every node input whose element type the .ort format
    has no type for (initializers, Constant values, graph inputs and inferred values)."""
    import onnx

    model = onnx.load(os.fspath(src))
    with contextlib.suppress(Exception):   # shape inference only adds the types of intermediate values
        model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in (*g.input, *g.value_info, *g.output):
        if vi.type.HasField("tensor_type"):
            types.setdefault(vi.name, vi.type.tensor_type.elem_type)
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    ok = _ort_types()
    out = []
    for node in g.node:
        for name in node.input:
            if name and types.get(name, 1) not in ok:
                type_name = onnx.TensorProto.DataType.Name(types[name])
                where = f" (node {node.name!r})" if node.name else ""
                out.append((f"{node.domain or 'ai.onnx'}:{node.op_type}{where} reads {name!r} ({type_name})",
                            type_name))
    return out


def _ort_message(err: Exception) -> str:
    text = " ".join(str(err).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return re.sub(r"^Load model from .*? failed:", "", text).strip()[:300]


def _why(src, err: Exception) -> str:
    """One line: the file, the ops onnxruntime has no CPU kernel for (if that is why), onnxruntime's own words."""
    text = _ort_message(err)
    missing = []
    with contextlib.suppress(Exception):   # the diagnosis is a courtesy: never hide onnxruntime's message behind it
        missing = unimplemented_ops(src)
    named = [m for m in missing if m.split(" ")[0].split(":")[-1] in text] or missing
    what = f"op {', '.join(named[:3])} has no onnxruntime CPU kernel" if named else "onnxruntime cannot load it"
    return f"{Path(src).name}: cannot convert to .ort: {what} ({text})"


def unimplemented_ops(src) -> list[str]:
    """``domain:op (node 'name')`` of every node whose op onnxruntime's CPU provider has no kernel for at the
    graph's opset (model-local functions excluded: onnxruntime inlines them)."""
    import onnx
    from onnxruntime.capi import _pybind_state

    model = onnx.load(os.fspath(src), load_external_data=False)
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    local = {(f.domain, f.name) for f in model.functions}
    kernels: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for k in _pybind_state.get_all_opkernel_def():
        if k.provider == "CPUExecutionProvider":
            kernels.setdefault((k.domain, k.op_name), []).append(tuple(k.version_range))
    out = []
    for node in model.graph.node:
        domain = "" if node.domain == "ai.onnx" else node.domain
        if (node.domain, node.op_type) in local:
            continue
        version = opsets.get(domain)
        ranges = kernels.get((domain, node.op_type), [])
        if not ranges or version is None or not any(lo <= version <= hi for lo, hi in ranges):
            desc = f"{domain or 'ai.onnx'}:{node.op_type} (node {node.name!r})"
            if desc not in out:
                out.append(desc)
    return out


def write_required_operators(ort_files, dst, *, runtime_sources=None, optimization_level: str = "all",
                             target_platform: str = "arm") -> dict[str, dict[str, list[str]]]:
    """The combined ``required_operators.config`` of ``ort_files`` (onnxruntime's ``create_config_from_models``:
    lines ``domain;opset;Op1,Op2``), written atomically; returns domain -> opset -> ops.

    ``runtime_sources``: the .onnx files of ``runtime``-style .ort files; as the tool does, they are converted once
    more without saved runtime optimizations (to a temporary folder) so that the config also holds the ops a build
    needs when the saved optimizations are not replayed."""
    from onnxruntime.tools.ort_format_model import create_config_from_models

    ort_files = [Path(p) for p in ort_files]
    dst = Path(dst)
    with tempfile.TemporaryDirectory() as work:
        models = list(ort_files)
        for i, src in enumerate(runtime_sources or ()):
            companion = Path(work) / f"{i}_{Path(src).stem}.ort"
            _check(optimization_level, "fixed", target_platform)
            _save(src, companion, optimization_level=optimization_level, target_platform=target_platform,
                  minimal="apply")
            models.append(companion)
        raw = Path(work) / CONFIG_NAME
        tool_log = logging.getLogger("ort_format_model.utils")
        level = tool_log.level
        tool_log.setLevel(logging.WARNING)   # its "Created config in <path>" line
        try:
            create_config_from_models(models, raw, False)
        finally:
            tool_log.setLevel(level)
        body = [ln for ln in raw.read_text().splitlines() if ln and not ln.startswith("#")]
    header = ["# Generated from model/s:", *(f"# - {p.name}" for p in sorted(ort_files, key=lambda p: p.name))]
    if runtime_sources:
        header.append("# (and their conversions without saved runtime optimizations)")
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text("\n".join(header + body) + "\n")
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return parse_required_operators(dst)


def parse_required_operators(path) -> dict[str, dict[str, list[str]]]:
    """domain -> opset -> ops of a ``required_operators.config`` (without type reduction)."""
    out: dict[str, dict[str, list[str]]] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        domain, opset, ops = line.split(";", 2)
        out.setdefault(domain, {})[opset] = ops.split(",")
    return out


def _ep(info) -> dict:
    verdict = VERDICTS[info.suitability().name]
    return {"verdict": verdict, "nodes": info.num_nodes, "supported_nodes": info.num_supported_nodes,
            "partitions": info.num_partitions, "unsupported_ops": sorted(info.unsupported_ops)}


def mobile_usability(src) -> dict:
    """onnxruntime's mobile usability checker on ``src`` (.onnx) as data, per execution provider:

    ``{"nnapi": "supported" | "partial" | "unsupported", "coreml": ..., "coreml_format": "mlprogram" |
    "neuralnetwork", "fixed_shape_needed": {"nnapi": bool, "coreml": bool}, "detail": "<one line>",
    "eps": {"nnapi" | "coreml_mlprogram" | "coreml_neuralnetwork": {"verdict", "as_is", "fixed_shape",
    "fixed_shape_needed", "counted_with_fixed_shape", "nodes", "supported_nodes", "partitions",
    "unsupported_ops"}}}``

    As ``check_onnx_model_mobile_usability`` does: the graph at onnxruntime's basic level, shapes inferred; each
    provider judged as the graph is and, when an input has a dynamic size (the batch), with fixed shapes, keeping
    the better (then ``fixed_shape_needed``: fix the batch with ``onnxruntime.tools.make_dynamic_shape_fixed``).
    ``supported`` = one partition with > 75 % of the nodes; ``partial`` = worth measuring; ``unsupported`` =
    the CPU provider will do better. The check is by op type only (the caveats per op are not verified)."""
    import onnxruntime as ort
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    with tempfile.TemporaryDirectory() as work:
        basic = Path(work) / "model.onnx"
        optimize_model(Path(src), basic, level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, log_level=3,
                       use_external_initializers=True)
        model = ModelProtoWithShapeInfo(basic).model_with_shape_info
    dynamic_inputs, _ = uc.check_shapes(model.graph)
    checks = {"nnapi": uc.check_nnapi_partitions,
              "coreml_mlprogram": lambda m, fixed: uc.check_coreml_partitions(m, fixed,
                                                                             "coreml_supported_mlprogram_ops.md"),
              "coreml_neuralnetwork": lambda m, fixed: uc.check_coreml_partitions(
                  m, fixed, "coreml_supported_neuralnetwork_ops.md")}
    eps = {}
    for name, check in checks.items():
        as_is = _ep(check(model, True))
        fixed = _ep(check(model, False)) if as_is["verdict"] != "supported" and dynamic_inputs else None
        # the counts with a fixed shape when there is one (what a user who fixes the batch gets), else as is
        best = fixed if fixed is not None and _RANK[fixed["verdict"]] >= _RANK[as_is["verdict"]] else as_is
        eps[name] = {**best, "as_is": as_is["verdict"], "fixed_shape": fixed and fixed["verdict"],
                     "counted_with_fixed_shape": best is fixed,
                     "fixed_shape_needed": fixed is not None and _RANK[fixed["verdict"]] > _RANK[as_is["verdict"]]}
    coreml_format = max(("coreml_mlprogram", "coreml_neuralnetwork"), key=lambda k: _RANK[eps[k]["verdict"]])

    def line(label, e):
        text = (f"{label} {e['verdict']}"
                + (" once the input shape is fixed" if e["fixed_shape_needed"] else "")
                + f": {e['partitions']} partition(s) over {e['supported_nodes']}/{e['nodes']} nodes"
                + (" with a fixed input shape" if e["counted_with_fixed_shape"] else ""))
        return text + (f", unsupported ops {' '.join(e['unsupported_ops'])}" if e["unsupported_ops"] else "")

    detail = "; ".join((line("NNAPI", eps["nnapi"]), line("CoreML MLProgram", eps["coreml_mlprogram"]),
                        line("CoreML NeuralNetwork", eps["coreml_neuralnetwork"])))
    return {"nnapi": eps["nnapi"]["verdict"], "coreml": eps[coreml_format]["verdict"],
            "coreml_format": coreml_format.removeprefix("coreml_"),
            "fixed_shape_needed": {"nnapi": eps["nnapi"]["fixed_shape_needed"],
                                   "coreml": eps[coreml_format]["fixed_shape_needed"]},
            "detail": detail, "eps": eps}
