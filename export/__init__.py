"""ONNX export and ONNX Runtime evaluation / latency for the compressed classifiers."""
from .onnx_export import ExportParityError, ExportReport, export_onnx
from .ort_runtime import (
    LatencyStats, host_device_description, measure_latency_interleaved, onnx_macs, onnx_param_count,
    ort_accuracy, ort_predict, ort_session, profile_op_types, read_metadata,
)

__all__ = [
    "ExportParityError", "ExportReport", "export_onnx",
    "LatencyStats", "host_device_description", "measure_latency_interleaved", "onnx_macs", "onnx_param_count",
    "ort_accuracy", "ort_predict", "ort_session", "profile_op_types", "read_metadata",
]
