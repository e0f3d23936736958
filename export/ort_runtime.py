"""ONNX Runtime inference, profiling and static inspection of exported ONNX files (latency: device_bench.py).

onnx / onnxruntime are imported inside functions so that importing ``export`` stays cheap for
stages that never touch ONNX.
"""
from __future__ import annotations

import os

import numpy as np
import torch

_OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

_FLOAT_TYPES = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16 (onnx.TensorProto enum values)


def ort_session(path, *, intra_op_threads: int = 1, inter_op_threads: int = 1, optimization: str = "all",
                profile_prefix: str | None = None):
    import onnxruntime as ort

    if optimization not in _OPT_LEVELS:
        raise ValueError(f"optimization must be one of {sorted(_OPT_LEVELS)}, got {optimization!r}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(intra_op_threads)
    opts.inter_op_num_threads = int(inter_op_threads)
    # Sequential: inter-op parallelism would make latency depend on scheduling, not on the model.
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[optimization])
    # Spinning threads burn the cores the interleaved competitor needs; off makes A/B timings fairer.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(os.fspath(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _as_float32(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    # uint8 images would be silently misread as [0, 255]; the exported graph expects [0, 1] floats.
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}")
    return np.ascontiguousarray(images, dtype=np.float32)


def ort_predict(session, images, batch_size: int = 256) -> np.ndarray:
    x = _as_float32(images)
    name = session.get_inputs()[0].name
    outs = [session.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs, axis=0)


def ort_accuracy(session, images, labels, batch_size: int = 256) -> float:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    pred = ort_predict(session, images, batch_size).argmax(axis=1)
    return float((pred == labels).mean() * 100.0)


def read_metadata(path) -> dict[str, str]:
    import onnx

    # load_external_data=False: only the header is needed, never the weights.
    model = onnx.load(os.fspath(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def float_initializer_count(model) -> int:
    """Elements of float initializers of an in-memory ModelProto (int64 shape constants are not parameters)."""
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer if t.data_type in _FLOAT_TYPES)


def onnx_param_count(path, *, float_only: bool = True) -> int:
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    if float_only:
        return float_initializer_count(model)
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer)


def _dims(type_proto):
    shape = type_proto.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]


def onnx_macs(path) -> int:
    """Multiply-accumulates for one image, from Conv, Gemm and MatMul nodes only."""
    import onnx

    model = onnx.load(os.fspath(path))
    graph = model.graph
    init_names = {t.name for t in graph.initializer}
    batch_params = set()
    for inp in graph.input:
        if inp.name in init_names:
            continue
        dim0 = inp.type.tensor_type.shape.dim[0]
        if dim0.HasField("dim_param"):
            batch_params.add(dim0.dim_param)
        dim0.Clear()
        dim0.dim_value = 1
    # The same symbol on outputs (and stale value_info) would otherwise clash with the fixed batch of 1.
    for out in graph.output:
        for d in out.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in batch_params:
                d.Clear()
                d.dim_value = 1
    del graph.value_info[:]
    graph = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph

    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        shapes.setdefault(vi.name, _dims(vi.type))

    def shape_of(name, node):
        s = shapes.get(name)
        if s is None or any(d is None for d in s):
            raise ValueError(f"unknown shape for {name!r} of {node.op_type} node {node.name!r}")
        return s

    total = 0
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            w = shape_of(node.input[1], node)
            y = shape_of(node.output[0], node)
            # w = [C_out, C_in/groups, kH, kW]: its product already is C_out * C_in/groups * kernel.
            total += int(np.prod(y[2:], dtype=np.int64)) * int(np.prod(w, dtype=np.int64))
        elif node.op_type == "Gemm":
            a = shape_of(node.input[0], node)
            b = shape_of(node.input[1], node)
            m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
            n = b[0] if attrs.get("transB", 0) else b[1]
            total += m * k * n
        elif node.op_type == "MatMul":
            a = shape_of(node.input[0], node)
            y = shape_of(node.output[0], node)
            # Y holds one k-long dot product per element (broadcast batch dims included); k is A's last dim.
            total += int(np.prod(y, dtype=np.int64)) * a[-1]
    return int(total)


def profile_op_types(path, *, optimization: str = "all", threads: int = 1, batch: int = 1, runs: int = 100,
                     seed: int = 0) -> dict[str, dict]:
    """Where one inference spends its time: onnxruntime's profiler, kernel time per op type.

    Returns op type -> {"us_per_run", "share", "nodes"}; the op types are those of the *optimised* graph
    (e.g. NCHWc ``ReorderInput`` / fused ``Conv`` at level ``all``), which is what actually runs."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        sess = ort_session(path, intra_op_threads=threads, optimization=optimization,
                           profile_prefix=os.path.join(tmp, "profile"))
        inp = sess.get_inputs()[0]
        x = np.random.default_rng(seed).random((batch, *inp.shape[1:]), dtype=np.float32)
        for _ in range(10):   # warm-up runs are profiled too; dropped below by keeping the last ``runs``
            sess.run(None, {inp.name: x})
        for _ in range(runs):
            sess.run(None, {inp.name: x})
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    kernel = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    per_run = len(kernel) // (runs + 10)
    kernel = kernel[-per_run * runs:] if per_run else []
    totals: dict[str, list] = {}
    for e in kernel:
        op = e.get("args", {}).get("op_name", "?")
        t = totals.setdefault(op, [0.0, set()])
        t[0] += e["dur"]
        t[1].add(e["name"])
    all_us = sum(t[0] for t in totals.values()) or 1.0
    out = {op: {"us_per_run": us / runs, "share": us / all_us, "nodes": len(names)}
           for op, (us, names) in totals.items()}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["us_per_run"]))
