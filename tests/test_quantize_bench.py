"""int8 static quantisation, and the bench stage's per-device summaries (noise share, int8 change, Pareto front)."""
import numpy as np
import pytest
import torch

from export import ort_predict, ort_session
from export.onnx_export import export_onnx
from export.quantize import quantize_int8
from models import create_model
from pipeline.report.plots import pareto_front
from pipeline.stages.bench import int8_change, noise_overhead


@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("q") / "m.onnx"
    export_onnx(create_model("test_resnet", noise_coef=0.1).eval(), path)
    return path


def test_int8_is_qdq_per_channel_and_close_to_float(float_onnx, tmp_path):
    import onnx

    rng = np.random.default_rng(0)
    calib = rng.random((64, 3, 32, 32), dtype=np.float32)
    dst = tmp_path / "m_int8.onnx"
    rep = quantize_int8(float_onnx, dst, calib, per_channel=True)
    ops = [n.op_type for n in onnx.load(dst).graph.node]
    assert rep["quantize_nodes"] > 0 and ops.count("DequantizeLinear") == rep["dequantize_nodes"] > 0
    conv_weights = [n for n in onnx.load(dst).graph.node if n.op_type == "DequantizeLinear"
                    and any(t.name == n.input[1] and len(t.dims) == 1 and t.dims[0] > 1
                            for t in onnx.load(dst).graph.initializer)]
    assert conv_weights, "per-channel weights have a vector of scales"
    x = rng.random((32, 3, 32, 32), dtype=np.float32)
    f32, i8 = ort_predict(ort_session(float_onnx), x), ort_predict(ort_session(dst), x)
    assert np.abs(f32 - i8).max() < 0.1 * np.abs(f32).max()


def test_quantize_rejects_bad_calibration_and_leaves_nothing(float_onnx, tmp_path):
    with pytest.raises(ValueError, match="calibration"):
        quantize_int8(float_onnx, tmp_path / "x.onnx", np.zeros((0, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="method"):
        quantize_int8(float_onnx, tmp_path / "x.onnx", np.zeros((4, 3, 32, 32), np.float32), method="magic")
    assert list(tmp_path.iterdir()) == []


def _row(device, artifact, model, variant, p50, batch=1, emulated=False):
    return {"device": device, "artifact": artifact, "model": model, "variant": variant, "p50_ms": p50,
            "batch": batch, "threads": 1, "graph_optimization": "all", "emulated": emulated}


def test_noise_overhead_and_int8_change_pair_rows_of_the_same_device_and_setting():
    rows = [_row("host", "dense", "dense", "deterministic", 1.0), _row("host", "dense_stochastic", "dense",
                                                                        "stochastic", 4.0),
            _row("host", "dense_int8", "dense", "int8", 0.5),
            _row("pi", "dense", "dense", "deterministic", 10.0), _row("pi", "dense_stochastic", "dense",
                                                                      "stochastic", 12.5),
            _row("host", "dense_stochastic", "dense", "stochastic", 9.0, batch=8)]   # no deterministic partner
    over = {(x["device"], x["batch"]): x for x in noise_overhead(rows)}
    assert set(over) == {("host", 1), ("pi", 1)}
    assert over[("host", 1)]["noise_share"] == pytest.approx(0.75)
    assert over[("pi", 1)]["noise_share"] == pytest.approx(0.2)
    devices = {"host": {"emulated": False, "artifacts": {"dense": {"bytes": 1000, "accuracy": 50.0},
                                                         "dense_int8": {"bytes": 300, "accuracy": 49.0}}}}
    (ch,) = int8_change(rows, devices)
    assert ch["latency_ratio"] == pytest.approx(0.5) and ch["size_ratio"] == pytest.approx(0.3)
    assert ch["accuracy_change_pt"] == pytest.approx(-1.0)


def test_pareto_front():
    pts = [(1.0, 50.0), (2.0, 60.0), (1.5, 40.0), (3.0, 60.0), (0.5, 10.0)]
    assert pareto_front(pts) == [4, 0, 1]
