"""A float ONNX graph whose conv weights lie on a quantization grid, rewritten so that the file stores the grid's
integer codes: every such Conv reads its weight through ``DequantizeLinear(codes, scale per output channel)``.

Why per output channel when the grid is per layer (Binary-Relax, ADMM): the exporter folds a following
BatchNormalization into the conv (onnxsim, onnxruntime), which multiplies each output channel by its own factor --
the codes stay, each channel's scale changes. The codes come from the torch model (``codes`` in module order); a
graph weight is matched to the first unused torch weight of its shape whose codes it reproduces channel by channel.

``int4``: codes as opset-21 INT4 initializers (two per byte; onnxruntime's CPU provider dequantizes them), else
int8 holding the same values."""
from __future__ import annotations

import contextlib
import os
import uuid

import numpy as np

MATCH_RTOL = 1e-4


def _per_channel_scale(w: np.ndarray, q: np.ndarray) -> np.ndarray | None:
    """s with w[c] == s[c]·q[c] (within float rounding) for every output channel c, else None."""
    w2, q2 = w.reshape(len(w), -1).astype(np.float64), q.reshape(len(q), -1).astype(np.float64)
    qq = (q2 * q2).sum(1)
    s = np.where(qq > 0, (w2 * q2).sum(1) / np.where(qq > 0, qq, 1), 1.0)
    err = np.abs(w2 - s[:, None] * q2).max(1)
    if (err > MATCH_RTOL * np.abs(w2).max(1) + 1e-12).any():
        return None
    return s.astype(np.float32)


def write_grid_graph(src, dst, codes: list[np.ndarray], *, int4: bool) -> dict:
    """Rewrite ``src`` (float ONNX) into ``dst`` with every conv weight that matches one of ``codes`` stored as
    codes + per-channel scales. Raises ValueError when a torch weight finds no conv in the graph."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(os.fspath(src))
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    unused = list(range(len(codes)))
    converted, total_codes, zeros = 0, 0, 0
    new_nodes = []
    for node in graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            for k in unused:
                q = codes[k]
                if q.shape != w.shape:
                    continue
                scale = _per_channel_scale(w, q)
                if scale is None:
                    continue
                unused.remove(k)
                name = node.input[1]
                graph.initializer.remove(inits[name])
                if int4:   # raw bytes, two codes per byte (make_tensor would spend a varint per pair)
                    import ml_dtypes

                    graph.initializer.append(numpy_helper.from_array(q.astype(np.int8).astype(ml_dtypes.int4),
                                                                     f"{name}_codes"))
                    graph.initializer.append(numpy_helper.from_array(np.zeros(len(q), ml_dtypes.int4),
                                                                     f"{name}_zero"))
                else:
                    graph.initializer.append(numpy_helper.from_array(q.astype(np.int8), f"{name}_codes"))
                    graph.initializer.append(numpy_helper.from_array(np.zeros(len(q), np.int8), f"{name}_zero"))
                graph.initializer.append(numpy_helper.from_array(scale, f"{name}_scale"))
                new_nodes.append(helper.make_node("DequantizeLinear", [f"{name}_codes", f"{name}_scale",
                                                                       f"{name}_zero"], [name], axis=0,
                                                  name=f"{name}_DequantizeLinear"))
                converted += 1
                total_codes += q.size
                zeros += int((q == 0).sum())
                break
        new_nodes.append(node)
    if unused:
        raise ValueError(f"{len(unused)} quantized torch weight(s) found no conv in {src} with their codes "
                         f"(shapes {[tuple(codes[k].shape) for k in unused[:3]]})")
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    if int4:   # INT4 DequantizeLinear is opset 21
        for op in proto.opset_import:
            if op.domain in ("", "ai.onnx"):
                op.version = max(op.version, 21)
        proto.ir_version = max(proto.ir_version, 10)
    onnx.checker.check_model(proto, full_check=True)
    dst = os.path.abspath(os.fspath(dst))
    tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.{uuid.uuid4().hex}.tmp")
    try:
        onnx.save(proto, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return {"quantized_convs": converted, "weight_format": "int4" if int4 else "int8", "codes": total_codes,
            "zero_codes": zeros, "bytes": os.path.getsize(dst), "source_bytes": os.path.getsize(src)}
