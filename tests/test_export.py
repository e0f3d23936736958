import os

import numpy as np
import pytest
import torch
import torch.nn as nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxsim")

import models  # noqa: E402
from export import (  # noqa: E402
    ExportParityError, export_onnx, onnx_macs,
    onnx_param_count, ort_accuracy, ort_predict, ort_session, profile_op_types, read_metadata,
)
from export import onnx_export as onnx_export_mod  # noqa: E402

# The legacy exporter warns on every dynamo=False call; choosing it here is deliberate.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

META = {"model": "test_resnet", "ensemble": "2", "stage": "baseline"}


def _model():
    torch.manual_seed(0)
    return models.create_model("test_resnet", ensemble=2, noise_coef=0.1)


def _torch_logits(model, x):
    """Reference logits: eval mode, noise off; the model's train mode is given back."""
    was_training = model.training
    model.eval()
    try:
        with models.noise_disabled(model), torch.no_grad():
            return model(x).numpy()
    finally:
        model.train(was_training)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export per exporter path, shared: the dynamo export alone takes a few seconds."""
    model = _model()
    model.train()  # export must not care, and must give it back in train mode
    out = {}
    for dynamo in (True, False):
        path = tmp_path_factory.mktemp("onnx") / f"m_dynamo{int(dynamo)}.onnx"
        report = export_onnx(model, path, opset=18, dynamo=dynamo, simplify=True, metadata=META)
        out[dynamo] = report
    return model, out


@pytest.mark.parametrize("dynamo", [True, False])
def test_export_checked_parity_metadata(exported, dynamo):
    model, reports = exported
    r = reports[dynamo]
    assert os.path.isfile(r.path) and r.opset == 18 and r.simplified
    assert r.parity_max_abs_diff <= 1e-4
    assert 0 < r.nodes_after <= r.nodes_before
    assert r.params == onnx_param_count(r.path) > 0

    proto = onnx.load(r.path)
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_param")
    assert not any("Random" in n.op_type for n in proto.graph.node), "noise leaked into the graph"
    assert read_metadata(r.path) == META

    # Export restores train mode and leaves the noise switched on.
    assert all(m.training for m in model.modules())
    assert all(m.enabled for m in model.modules() if isinstance(m, models.ResidualNoise))


@pytest.mark.parametrize("dynamo", [True, False])
def test_dynamic_batch(exported, dynamo):
    model, reports = exported
    sess = ort_session(reports[dynamo].path, intra_op_threads=1, inter_op_threads=1, optimization="all")
    for n in (1, 5):
        x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))
        got = ort_predict(sess, x, batch_size=256)
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, _torch_logits(model, x), atol=1e-4, rtol=0)


def test_ort_accuracy_matches_torch(exported):
    model, reports = exported
    g = torch.Generator().manual_seed(7)
    x = torch.rand(40, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (40,), generator=g)
    # Make the labels partly right so the comparison is not trivially ~10% vs ~10%.
    y[:20] = torch.from_numpy(_torch_logits(model, x[:20]).argmax(1))
    torch_acc = float((torch.from_numpy(_torch_logits(model, x)).argmax(1) == y).float().mean() * 100)
    sess = ort_session(reports[True].path)
    assert ort_accuracy(sess, x, y, batch_size=16) == pytest.approx(torch_acc)
    assert ort_accuracy(sess, x.numpy(), y.numpy(), batch_size=256) == pytest.approx(torch_acc)
    with pytest.raises(ValueError, match="float"):
        ort_predict(sess, (x * 255).to(torch.uint8))


def test_failed_parity_is_atomic(tmp_path, monkeypatch):
    model = _model()
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous good export")
    real_predict = onnx_export_mod.ort_predict
    monkeypatch.setattr(onnx_export_mod, "ort_predict", lambda *a, **k: real_predict(*a, **k) + 1.0)

    with pytest.raises(ExportParityError) as err:
        export_onnx(model, path, dynamo=False, simplify=True, parity_tol=1e-4)
    assert err.value.max_abs_diff == pytest.approx(1.0, abs=1e-3)
    assert path.read_bytes() == b"previous good export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temp file left behind

    fresh = tmp_path / "fresh.onnx"
    with pytest.raises(ExportParityError):
        export_onnx(model, fresh, dynamo=False, simplify=False, parity_tol=1e-4)
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_metadata_must_be_str(tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(ValueError, match="str"):
        export_onnx(_model(), path, dynamo=False, metadata={"epochs": 10})
    assert list(tmp_path.iterdir()) == []


def test_device_bench_times_each_model_at_its_levels(exported, tmp_path):
    """export/device_bench.py through the host transport: per-model levels, ordered percentiles, runtime facts."""
    from pipeline.config import DeviceConfig
    from pipeline.devices import run_on_device, write_job

    _, reports = exported
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    write_job(tmp_path / "job", {"a": reports[True].path, "b": reports[False].path}, x,
              settings=[{"batch": 2, "threads": 1}], levels={"a": ["disable", "all"], "b": ["all"]},
              warmup=1, runs=5, seed=0, predict_batch=3)
    r = run_on_device(DeviceConfig(), tmp_path / "job")
    assert sorted((row["model"], row["graph_optimization"]) for row in r["latency"]) == [
        ("a", "all"), ("a", "disable"), ("b", "all")]
    for row in r["latency"]:
        assert row["runs"] == 5 and row["batch"] == 2 and row["threads"] == 1
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
    assert r["runtime"]["emulated"] is False and r["runtime"]["cpu"] and r["runtime"]["cores"] >= 1
    logits = np.asarray(r["models"]["a"]["logits"])
    assert logits.shape == (4, 10)            # batches of 3 cover all 4 images
    assert np.allclose(logits, ort_predict(ort_session(reports[True].path), x), atol=1e-5)


def test_profile_op_types_accounts_per_run(exported):
    _, reports = exported
    path = reports[True].path
    extended = profile_op_types(path, optimization="extended", runs=20)
    # test_resnet En_2: 18 convs (some fused with their relu at 'extended'), 2 classifiers
    convs = sum(v["nodes"] for k, v in extended.items() if k in ("Conv", "FusedConv"))
    assert convs == 18 and extended["Gemm"]["nodes"] == 2
    assert sum(v["share"] for v in extended.values()) == pytest.approx(1.0)
    assert all(v["us_per_run"] > 0 for v in extended.values())
    assert list(extended) == sorted(extended, key=lambda k: -extended[k]["us_per_run"])
    # level 'all' runs the NCHWc layout: its reorder kernels show up, and BN is gone (folded or fused)
    nchwc = profile_op_types(path, optimization="all", runs=20)
    assert any(k.startswith("Reorder") for k in nchwc) and "BatchNormalization" not in nchwc


class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=1, padding=1)
        self.gconv = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2, bias=False)
        self.fc = nn.Linear(4 * 16 * 16, 5)

    def forward(self, x):
        return self.fc(self.gconv(self.conv(x)).flatten(1))


def test_onnx_macs_hand_computed(tmp_path):
    path = tmp_path / "tiny.onnx"
    r = export_onnx(_TinyNet(), path, dynamo=False, simplify=True)
    conv = 32 * 32 * 4 * 3 * 3 * 3  # out_h*out_w*C_out*C_in*kH*kW
    gconv = 16 * 16 * 4 * (4 // 2) * 3 * 3  # stride 2, groups 2
    fc = 4 * 16 * 16 * 5
    assert onnx_macs(path) == conv + gconv + fc == 134_144
    assert r.params == onnx_param_count(path) == (4 * 27 + 4) + 4 * 2 * 9 + (1024 * 5 + 5)

    # MatMul with a broadcast batch dim: [N, 4, 6] x [6, 3] -> 4 * 3 dot products of length 6 per image.
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.ones((6, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 3])], [w])
    mm = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), mm)
    assert onnx_macs(mm) == 4 * 3 * 6
