"""Quantization-aware adversarial training and Binary-Relax end to end on the smoke config: the trained quantized
graphs are written, their torch twins match onnxruntime, the qeval stage attacks them white-box (and checks them
against transfer), the report has the quantized robustness table, and ``pipeline eval --run`` re-evaluates them
without retraining."""
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

REPO = Path(__file__).resolve().parent.parent
CHEAP = ["--set", 'eval.attacks=["fgsm","pgd"]', "--set", "eval.images=64", "--set", "eval.sweep_steps=2",
         "--set", "eval.pgd_steps=3", "--set", 'eval.noise_modes=["noise_off"]',
         "--set", 'export.noise_variants=["deterministic"]', "--set", "quantize.epochs=1",
         "--set", "bench.runs=10", "--set", "bench.warmup=2", "--set", 'bench.optimizations=["all"]',
         "--set", "bench.batches=[1]", "--set", "bench.threads=[1]"]


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _ok(proc):
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _run(tmp_path_factory, name, *sets):
    out = tmp_path_factory.mktemp(name) / "run"
    proc = _cli("run", "--config", "configs/smoke.toml", *CHEAP, *sets, "--out", str(out))
    _ok(proc)
    return out, json.loads((out / "manifest.json").read_text()), proc


@pytest.fixture(scope="module")
def qat(cifar_root, tmp_path_factory):
    return _run(tmp_path_factory, "qat", "--set", "quantize.method=qat")


@pytest.fixture(scope="module")
def binary_relax(cifar_root, tmp_path_factory):
    return _run(tmp_path_factory, "br", "--set", "quantize.method=binary_relax", "--set", "quantize.bits=4",
                "--set", "quantize.epochs=2", "--set", 'quantize.models=["pruned"]')


def _whitebox_checks(manifest, name):
    res = manifest["stages"]["qeval"]["metrics"]["models"][name]
    checks = {c["check"]: c for c in res["sanity"]}
    assert checks["twin_agrees_with_onnxruntime"]["ok"], checks["twin_agrees_with_onnxruntime"]
    assert any(k.endswith("_not_above_transfer") for k in checks)   # compared with the transfer attack
    assert {"natural", "attacks"} <= res.keys() and {"fgsm", "pgd"} <= res["attacks"].keys()
    return res


def test_qat_writes_int8_graphs_that_run_as_their_twins(qat):
    out, manifest, _ = qat
    q = manifest["stages"]["quantize"]["metrics"]
    assert q["method"] == "qat"
    for model in ("dense", "pruned"):
        name = f"{model}_qat_int8"
        assert (out / "quantize" / f"{name}.onnx").is_file()
        assert q[name]["trained_epochs"] == 1
        assert q[name]["twin_diff_steps"] <= 1.001 and q[f"{model}_int8"]["twin_diff_steps"] <= 1.001   # float rounding
        ops = {n.op_type for n in onnx.load(str(out / "quantize" / f"{name}.onnx")).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        _whitebox_checks(manifest, name)
        _whitebox_checks(manifest, f"{model}_int8")   # PTQ is attacked white-box too


def test_report_has_the_quantized_robustness_table(qat):
    out, _, _ = qat
    md = (out / "report.md").read_text()
    table = md.split("## Quantized and still robust", 1)[1].split("\n## ", 1)[0]
    for row in ("| dense | float |", "| dense_int8 | PTQ int8", "| pruned_qat_int8 | QAT int8 |"):
        assert row in table
    report = json.loads((out / "report.json").read_text())
    assert {r["artifact"] for r in report["quantized"]} >= {"dense", "pruned", "dense_qat_int8", "pruned_qat_int8"}


def test_eval_rerun_attacks_the_quantized_models_without_retraining(qat):
    out, manifest, _ = qat
    before = manifest["stages"]["quantize"]["outputs"]["pruned_qat_int8_onnx"]["sha256"]
    proc = _cli("eval", "--run", str(out), "--set", "eval.pgd_steps=2")
    _ok(proc)
    assert "[quantize] running" not in proc.stdout and "[qeval] running" in proc.stdout
    after = json.loads((out / "manifest.json").read_text())
    assert after["stages"]["quantize"]["outputs"]["pruned_qat_int8_onnx"]["sha256"] == before
    pgd = after["stages"]["qeval"]["metrics"]["models"]["pruned_qat_int8"]["attacks"]["pgd"]
    assert "steps=2" in pgd["key"]


def test_binary_relax_ships_4bit_codes(binary_relax):
    out, manifest, _ = binary_relax
    q = manifest["stages"]["quantize"]["metrics"]
    assert "dense_br" not in q and q["pruned_br"]["bits"] == 4 and q["pruned_br"]["weight_format"] == "int4"
    assert q["pruned_br"]["grid_vs_float_max_abs_diff"] < 1e-4
    assert 0 <= q["pruned_br"]["grid_sparsity"] <= 100
    proto = onnx.load(str(out / "quantize" / "pruned_br.onnx"))
    codes = [i for i in proto.graph.initializer if i.name.endswith("_codes")]
    assert codes and all(i.data_type == onnx.TensorProto.INT4 for i in codes)
    assert any(o.domain in ("", "ai.onnx") and o.version >= 21 for o in proto.opset_import)
    _whitebox_checks(manifest, "pruned_br")
    assert "| pruned_br | Binary-Relax | 4 |" in (out / "report.md").read_text()
