"""The real CLI on configs/smoke.toml: all five stages, the report, resume, and a prune-only rerun.

One module-scoped fixture runs the pipeline three times (fresh, identical rerun, ``--set prune.lambda1``) and
keeps a snapshot of what the first run produced, so the tests below can be read in any order.
"""
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
STAGES = ("train", "prune", "surgery", "export", "bench")


@dataclass
class Run:
    proc: subprocess.CompletedProcess
    seconds: float


@dataclass
class Smoke:
    out: Path
    first: Run
    report: dict
    manifest: dict
    onnx_files: list
    second: Run
    third: Run
    third_manifest: dict


def _cli(out: Path, *extra: str) -> Run:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")   # tiny model: more threads only add contention
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--config", "configs/smoke.toml",
                           "--out", str(out), *extra], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    return Run(proc, time.perf_counter() - t0)


def _explain(run: Run) -> str:
    return f"rc={run.proc.returncode}\nstdout:\n{run.proc.stdout[-3000:]}\nstderr:\n{run.proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def smoke(cifar_root, tmp_path_factory) -> Smoke:
    out = tmp_path_factory.mktemp("smoke") / "run"
    first = _cli(out)
    assert first.proc.returncode == 0, _explain(first)
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    onnx_files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.onnx"))
    second = _cli(out)
    third = _cli(out, "--set", "prune.lambda1=1.0")
    third_manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    return Smoke(out, first, report, manifest, onnx_files, second, third, third_manifest)


def test_first_run_succeeds(smoke):
    assert smoke.first.proc.returncode == 0, _explain(smoke.first)
    for stage in STAGES:
        assert f"[{stage}] running" in smoke.first.proc.stdout.splitlines()
    assert "Traceback" not in smoke.first.proc.stderr


def test_exactly_two_onnx_files(smoke):
    assert smoke.onnx_files == ["export/dense.onnx", "export/pruned.onnx"]


def test_manifest_all_stages_done(smoke):
    m = smoke.manifest
    assert set(STAGES) <= set(m["stages"])
    for stage in STAGES:
        assert m["stages"][stage]["status"] == "done", stage
    for key in ("config", "versions", "git_commit"):
        assert key in m
    assert m["config"]["name"] == "smoke"


def test_report_fields(smoke):
    r = smoke.report
    models = r["models"]
    assert [m["variant"] for m in models] == ["dense", "pruned"]
    for m in models:
        for field in ("name", "variant", "onnx", "params", "macs", "channel_sparsity", "weight_sparsity",
                      "accuracy", "latency", "onnx_params", "onnx_macs", "onnx_accuracy"):
            assert field in m, (m["variant"], field)
        assert m["name"] == f"smoke-{m['variant']}"
        assert m["onnx"] == f"export/{m['variant']}.onnx" and (smoke.out / m["onnx"]).is_file()
        assert isinstance(m["params"], int) and m["params"] > 0
        assert isinstance(m["macs"], int) and m["macs"] > 0
        assert 0.0 <= m["channel_sparsity"] <= 100.0 and 0.0 <= m["weight_sparsity"] <= 100.0
        acc = m["accuracy"]
        assert "natural" in acc
        pgd_keys = [k for k in acc if re.fullmatch(r"pgd\d+", k)]
        assert pgd_keys == ["pgd5"]          # eval.pgd_steps = 5 in smoke.toml
        for v in acc.values():
            assert 0.0 <= v <= 100.0
        assert isinstance(m["latency"], list) and m["latency"]
        for lat in m["latency"]:
            for field in ("device", "runtime", "threads", "batch", "p50_ms", "p90_ms"):
                assert field in lat, field
            assert 0 < lat["p50_ms"] <= lat["p90_ms"]
            assert lat["threads"] == 1 and lat["batch"] == 1
        # One entry per configured ORT optimisation level (default: all, extended).
        assert [lat["graph_optimization"] for lat in m["latency"]] == ["all", "extended"]
    for field in ("max_abs_diff", "removed_channels", "zero_channels"):
        assert field in r["surgery"]


def test_dense_model_is_dense_and_pruned_is_smaller(smoke):
    dense, pruned = smoke.report["models"]
    assert dense["channel_sparsity"] == 0.0
    assert pruned["onnx_params"] < dense["onnx_params"]
    assert pruned["onnx_macs"] < dense["onnx_macs"]
    assert pruned["params"] < dense["params"] and pruned["macs"] < dense["macs"]
    s = smoke.report["surgery"]
    assert 0 < s["removed_channels"] <= s["zero_channels"]
    # pruned channel sparsity is the masked model's zero groups over all groups (118 for test_resnet En_2)
    assert s["total_channels"] == 2 * 59
    assert pruned["channel_sparsity"] == pytest.approx(100.0 * s["zero_channels"] / s["total_channels"])


def test_surgery_exact(smoke):
    assert smoke.report["surgery"]["max_abs_diff"] <= 1e-5


def test_onnx_accuracy_matches_torch(smoke):
    for m in smoke.report["models"]:
        oa = m["onnx_accuracy"]
        assert abs(oa["onnxruntime"] - oa["torch_noise_off"]) <= 0.5, m["variant"]
        assert oa["images"] == 256   # data.test_subset
        # the torch side of the ONNX comparison is the same evaluation as the report's noise-off accuracy
        if "natural_noise_off" in m["accuracy"]:
            assert oa["torch_noise_off"] == pytest.approx(m["accuracy"]["natural_noise_off"])


def test_surgery_checkpoint_loads_weights_only(smoke):
    state = torch.load(smoke.out / "surgery" / "model.pt", weights_only=True, map_location="cpu")
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    from pipeline.runio import load_model
    model = load_model(smoke.out / "surgery" / "model.pt", smoke.out / "surgery" / "model.json").eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_identical_rerun_skips_everything_quickly(smoke):
    run = smoke.second
    assert run.proc.returncode == 0, _explain(run)
    lines = run.proc.stdout.splitlines()
    for stage in STAGES:
        assert any(line.startswith(f"[{stage}] skipped") for line in lines), (stage, run.proc.stdout)
        assert f"[{stage}] running" not in lines
    assert run.seconds < 15, run.seconds


def test_prune_change_reruns_from_prune(smoke):
    run = smoke.third
    assert run.proc.returncode == 0, _explain(run)
    lines = run.proc.stdout.splitlines()
    assert any(line.startswith("[train] skipped") for line in lines), run.proc.stdout
    for stage in ("prune", "surgery", "export", "bench"):
        assert f"[{stage}] running" in lines, (stage, run.proc.stdout)
    m = smoke.third_manifest
    assert m["config"]["prune"]["lambda1"] == 1.0
    assert all(m["stages"][s]["status"] == "done" for s in STAGES)
    # train's entry is untouched; prune's key changed
    assert m["stages"]["train"]["key"] == smoke.manifest["stages"]["train"]["key"]
    assert m["stages"]["prune"]["key"] != smoke.manifest["stages"]["prune"]["key"]
    assert m["stages"]["prune"]["metrics"]["threshold"] == pytest.approx(2.0 ** 0.5)
