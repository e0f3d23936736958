"""onnxruntime static int8 quantisation: QDQ format, int8 per-channel weights, uint8 activations whose ranges
are calibrated on images the caller provides (training images -- never the test set)."""
from __future__ import annotations

import contextlib
import os
import tempfile
import uuid

import numpy as np


def quantize_int8(src, dst, calibration: np.ndarray, *, per_channel: bool = True, method: str = "minmax",
                  op_types: tuple[str, ...] = ("Conv", "Gemm", "MatMul", "Add"), batch: int = 32) -> dict:
    """Write the int8 QDQ model of ``src`` to ``dst`` atomically; returns what was done (node counts, sizes)."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise ValueError(f"method must be one of {sorted(methods)}, got {method!r}")
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    if calibration.ndim != 4 or len(calibration) == 0:
        raise ValueError(f"calibration images must be a non-empty [N,C,H,W] array, got shape {calibration.shape}")
    input_name = onnx.load(os.fspath(src), load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration[i:i + batch] for i in range(0, len(calibration), batch))

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {input_name: x}

    dst = os.path.abspath(os.fspath(dst))
    tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.{uuid.uuid4().hex}.tmp")
    with tempfile.TemporaryDirectory() as work:
        pre = os.path.join(work, "pre.onnx")
        # shape inference + ORT's basic fusions first, as onnxruntime's quantisation guide asks
        quant_pre_process(os.fspath(src), pre, skip_symbolic_shape=True)
        try:
            quantize_static(pre, tmp, Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=list(op_types), calibrate_method=methods[method],
                            extra_options={"CalibTensorRangeSymmetric": False})
            model = onnx.load(tmp)
            onnx.checker.check_model(model, full_check=True)
            os.replace(tmp, dst)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
    ops = [n.op_type for n in model.graph.node]
    return {"quantize_nodes": ops.count("QuantizeLinear"), "dequantize_nodes": ops.count("DequantizeLinear"),
            "calibration_images": int(len(calibration)), "per_channel": per_channel, "method": method,
            "op_types": list(op_types), "bytes": os.path.getsize(dst), "source_bytes": os.path.getsize(src)}
