"""onnxruntime's mobile format (export/mobile.py, the ``mobile`` stage): .ort files that load and compute their
.onnx's logits, the combined required_operators.config, the NNAPI / CoreML verdicts as data, and a graph onnxruntime
cannot convert as one line. The smoke pipeline's .ort files, config and report rows: tests/test_e2e_smoke.py."""
import numpy as np
import pytest
import torch

from export import ort_predict, ort_session
from export.mobile import (OrtConversionError, convert_to_ort, mobile_usability, parse_required_operators,
                           write_required_operators)
from export.onnx_export import export_onnx
from export.quantize import quantize_int8
from models import create_model


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """A tiny exported model (noise off) and its int8 QDQ graph."""
    d = tmp_path_factory.mktemp("mobile")
    torch.manual_seed(0)
    export_onnx(create_model("test_resnet", noise_coef=0.1).eval(), d / "m.onnx")
    calib = np.random.default_rng(0).random((32, 3, 32, 32), dtype=np.float32)
    quantize_int8(d / "m.onnx", d / "m_int8.onnx", calib)
    return d / "m.onnx", d / "m_int8.onnx"


def _custom_op_graph(path):
    """One node of an op in a domain onnxruntime has never heard of."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Mystery", ["image"], ["logits"], domain="custom.test", name="mystery_node")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                      helper.make_opsetid("custom.test", 1)]), path)
    return path


def _int4_graph(path):
    """x @ DequantizeLinear(int4 weights): what quantize.weight_format = "int4" writes (opset 21); onnxruntime runs
    it, and saves it as .ort, but its .ort format has no INT4 type and cannot load that file back."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = helper.make_tensor("w", TensorProto.INT4, [4, 4], [(i % 16) - 8 for i in range(16)])
    zero = helper.make_tensor("w_zero", TensorProto.INT4, [4], [0, 0, 0, 0])
    scale = numpy_helper.from_array(np.full((4,), 0.1, np.float32), "w_scale")
    nodes = [helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wf"], axis=0, name="dq"),
             helper.make_node("MatMul", ["image", "wf"], ["logits"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
                              [w, scale, zero])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    return path


def _optimised_ops(src, tmp_path) -> set[tuple[str, str]]:
    """(domain, op) of ``src`` optimised as the converter does (level all, no NCHWc, int8 QDQ allowed), saved as
    ONNX: what the .ort file holds."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / f"{src.stem}.optimized.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.qdqisint8allowed", "1")
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"])
    return {(n.domain or "ai.onnx", n.op_type) for n in onnx.load(so.optimized_model_filepath).graph.node}


def test_ort_loads_and_computes_the_onnx_logits(graphs, tmp_path):
    x = np.random.default_rng(1).random((16, 3, 32, 32), dtype=np.float32)
    for src in graphs:
        dst = tmp_path / f"{src.stem}.ort"
        rep = convert_to_ort(src, dst, optimization_level="all", optimization_style="fixed", target_platform="arm")
        assert dst.read_bytes()[4:8] == b"ORTM"     # the flatbuffer identifier of onnxruntime's format
        assert rep["bytes"] == dst.stat().st_size and rep["source_bytes"] == src.stat().st_size
        ref, got = ort_predict(ort_session(src), x), ort_predict(ort_session(dst), x)
        np.testing.assert_allclose(got, ref, atol=1e-5)
        assert (got.argmax(1) == ref.argmax(1)).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ort", "m_int8.ort"]   # no temp file left


def test_required_operators_lists_every_op_of_the_graphs(graphs, tmp_path):
    orts = [tmp_path / f"{src.stem}.ort" for src in graphs]
    for src, dst in zip(graphs, orts):
        convert_to_ort(src, dst)
    config = tmp_path / "sub" / "required_operators.config"
    config.parent.mkdir()
    ops = write_required_operators(orts, config)
    assert ops == parse_required_operators(config)
    listed = {(domain, op) for domain, by_opset in ops.items() for names in by_opset.values() for op in names}
    assert listed == _optimised_ops(graphs[0], tmp_path) | _optimised_ops(graphs[1], tmp_path)
    # the int8 graph's QDQ ops (and the int8 kernels onnxruntime fused them into on arm) are in it
    assert {("ai.onnx", "QuantizeLinear"), ("ai.onnx", "DequantizeLinear"), ("ai.onnx", "Conv")} <= listed
    assert ("com.microsoft", "QLinearConv") in listed
    text = config.read_text()
    assert "# - m.ort\n# - m_int8.ort\n" in text and str(tmp_path) not in text   # files named, not where they were
    assert sorted(p.name for p in config.parent.iterdir()) == ["required_operators.config"]


def test_runtime_style_keeps_unfused_ops_in_the_config(graphs, tmp_path):
    src = graphs[1]
    dst = tmp_path / "m_int8.ort"
    rep = convert_to_ort(src, dst, optimization_style="runtime")
    assert rep["optimization_style"] == "runtime"
    x = np.random.default_rng(2).random((4, 3, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(ort_predict(ort_session(dst), x), ort_predict(ort_session(src), x), atol=1e-5)
    ops = write_required_operators([dst], tmp_path / "required_operators.config", runtime_sources=[src])
    assert "QLinearConv" in ops["com.microsoft"]["1"]   # the fused kernels a build needs when the saved ones replay
    assert "without saved runtime optimizations" in (tmp_path / "required_operators.config").read_text()


def test_usability_verdicts_are_data(graphs):
    for src in graphs:
        u = mobile_usability(src)
        assert set(u) == {"nnapi", "coreml", "coreml_format", "fixed_shape_needed", "detail", "eps"}
        assert u["nnapi"] in ("supported", "partial", "unsupported") and u["coreml"] in (
            "supported", "partial", "unsupported")
        assert u["coreml_format"] in ("mlprogram", "neuralnetwork")
        assert set(u["eps"]) == {"nnapi", "coreml_mlprogram", "coreml_neuralnetwork"}
        for e in u["eps"].values():
            assert 0 <= e["supported_nodes"] <= e["nodes"] and e["partitions"] >= 0
        assert "\n" not in u["detail"] and u["detail"].startswith("NNAPI ")
        # every op of the plain CNN is an NNAPI op, but the batch dimension is dynamic: supported once it is fixed
        assert u["nnapi"] == "supported" and u["fixed_shape_needed"]["nnapi"] is True
        assert u["eps"]["nnapi"]["as_is"] == "unsupported"
    # CoreML has no QuantizeLinear / DequantizeLinear: the int8 graph is not for it
    assert "ai.onnx:QuantizeLinear" in mobile_usability(graphs[1])["eps"]["coreml_mlprogram"]["unsupported_ops"]


def test_an_op_onnxruntime_cannot_convert_is_one_line_naming_file_and_op(tmp_path):
    src = _custom_op_graph(tmp_path / "dense.onnx")
    with pytest.raises(OrtConversionError) as err:
        convert_to_ort(src, tmp_path / "dense.ort")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("dense.onnx: cannot convert to .ort: ")
    assert "custom.test:Mystery (node 'mystery_node') has no onnxruntime CPU kernel" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense.onnx"]   # nothing half-written


def test_int4_weights_are_one_line_naming_the_op(tmp_path, monkeypatch):
    import export.mobile

    src = _int4_graph(tmp_path / "pruned_br.onnx")
    ort_session(src)   # onnxruntime itself runs the graph
    with pytest.raises(OrtConversionError) as err:
        convert_to_ort(src, tmp_path / "pruned_br.ort")
    msg = str(err.value)
    assert "\n" not in msg and msg == ("pruned_br.onnx: cannot convert to .ort: onnxruntime's .ort format has no INT4 "
                                       "tensors: op ai.onnx:DequantizeLinear (node 'dq') reads 'w' (INT4), and 1 "
                                       "more input(s)")
    # without the type check, the file onnxruntime writes is caught when it is loaded back
    monkeypatch.setattr(export.mobile, "unstorable_tensors", lambda src: [])
    with pytest.raises(OrtConversionError, match=r"^pruned_br.onnx: cannot convert to .ort: onnxruntime wrote a "
                                                 r".ort file it cannot load \(Unsupported tensor data type"):
        convert_to_ort(src, tmp_path / "pruned_br.ort")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned_br.onnx"]


def test_the_stage_turns_it_into_a_user_error(tmp_path):
    from pipeline.config import RunConfig
    from pipeline.core.errors import UserError
    from pipeline.run.stage import StageContext
    from pipeline.stages import mobile

    src = _custom_op_graph(tmp_path / "dense.onnx")
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(cfg=RunConfig(), run_dir=tmp_path, out_dir=out, inputs={"export": {"dense_onnx": src},
                                                                                 "quantize": {}},
                       metrics_of={}, log=lambda m: None)
    with pytest.raises(UserError) as err:
        mobile.run(ctx)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("mobile: dense.onnx: cannot convert to .ort: op custom.test:Mystery")
    assert msg.endswith("; mobile.enabled = false goes without .ort files")


def test_bad_options_are_refused(graphs, tmp_path):
    for kwargs in ({"optimization_level": "max"}, {"optimization_style": "slow"}, {"target_platform": "x86"}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            convert_to_ort(graphs[0], tmp_path / "x.ort", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_report_rows_from_hand_made_metrics():
    from pipeline.report.build import mobile_summary
    from pipeline.report.markdown import _mobile_lines
    from pipeline.stages.bench import int8_change, noise_overhead

    usability = {"coreml_format": "neuralnetwork", "fixed_shape_needed": {"nnapi": True, "coreml": False},
                 "detail": "NNAPI supported once the input shape is fixed: ..."}
    st = {"mobile": {"outputs": {"pruned_ort": {"path": "mobile/pruned.ort"},
                                 "required_operators": {"path": "mobile/required_operators.config"}},
                     "metrics": {"enabled": True, "optimization_level": "all", "optimization_style": "fixed",
                                 "target_platform": "arm", "required_operators": {"count": 9, "ops": {}},
                                 "artifacts": {"pruned": {
                                     "file": "pruned.ort", "model": "pruned", "variant": "deterministic",
                                     "bytes": 45_000, "source_bytes": 16_000, "nnapi": "supported",
                                     "coreml": "partial", "usability": usability, "top1_agreement": 100.0,
                                     "max_abs_logit_diff": 3e-8, "images": 256}}}}}
    row = dict(device="host", emulated=False, batch=1, threads=1, graph_optimization="all", model="pruned",
               variant="deterministic")
    rows = [{**row, "artifact": "pruned", "format": "onnx", "p50_ms": 0.05},
            {**row, "artifact": "pruned.ort", "format": "ort", "p50_ms": 0.04},
            {**row, "artifact": "pruned_stochastic", "variant": "stochastic", "format": "onnx", "p50_ms": 0.1}]
    bench = {"latency_all": rows, "devices": {"host": {"kind": "host", "artifacts": {
        "pruned.ort": {"agreement_with_host": 100.0}}}, "board": {"kind": "ssh", "error": "down"}}}
    mob = mobile_summary(st, bench)
    (a,) = mob["artifacts"]
    assert (a["artifact"], a["host_p50_ms_b1_t1"], a["onnx_host_p50_ms_b1_t1"]) == ("pruned.ort", 0.04, 0.05)
    assert a["agreement_with_host"] == {"host": 100.0} and a["path"] == "mobile/pruned.ort"
    assert mob["required_operators"]["path"] == "mobile/required_operators.config"
    md = "\n".join(_mobile_lines({"mobile": mob}))
    assert "## Mobile (.ort)" in md and "| pruned.ort | 45 | 16 | supported † | partial (neuralnetwork) | 100.00 of 256" \
        in md and "| 0.040 / 0.050 |" in md
    assert mobile_summary({"mobile": {"metrics": {"enabled": False}}}, bench) is None and _mobile_lines({}) == []
    # the .ort row shares model and variant with its .onnx, but never stands in for it
    (over,) = noise_overhead(rows)
    assert over["deterministic_p50_ms"] == 0.05
    assert int8_change(rows, {}) == []


def test_the_stage_skips_int4_grid_graphs_with_a_reason(tmp_path):
    """Binary-Relax / ADMM grids at <= 4 bits are int4 by default: the .onnx ships, the .ort cannot exist, and the
    run goes on with the reason recorded (a custom op elsewhere is still an error, above)."""
    from pipeline.config import RunConfig
    from pipeline.run.stage import StageContext
    from pipeline.stages import mobile

    src = _int4_graph(tmp_path / "pruned_br.onnx")
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(cfg=RunConfig(), run_dir=tmp_path, out_dir=out,
                       inputs={"export": {}, "quantize": {"pruned_br_onnx": src}}, metrics_of={}, log=lambda m: None)
    result = mobile.run(ctx)
    assert result.outputs == {} and list(out.iterdir()) == []
    assert "no .ort: onnxruntime's .ort format has no INT4 tensors" in result.metrics["skipped"]["pruned_br"]
