"""ONNX export and ONNX Runtime evaluation / latency for the compressed classifiers."""
from .onnx_export import ExportParityError, ExportReport, export_onnx
from .ort_runtime import (
    onnx_macs, onnx_param_count,
    ort_accuracy, ort_predict, ort_session, profile_op_types, read_metadata,
)

__all__ = [
    "ExportParityError", "ExportReport", "export_onnx",
    "onnx_macs", "onnx_param_count",
    "ort_accuracy", "ort_predict", "ort_session", "profile_op_types", "read_metadata",
]
