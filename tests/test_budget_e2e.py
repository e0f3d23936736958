"""Pruning to a budget end to end on the smoke config: a MAC budget met by the physically pruned network, the finetune
stage (resumed after kill -9, skipped on a rerun), and the thin-from-scratch baseline beside the pruned model."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUDGET = ["--set", "prune.groups=coupled", "--set", "prune.align=2", "--set", "prune.budget=macs",
          "--set", "prune.target=2", "--set", "finetune.epochs=4"]
CHEAP = ["--set", 'eval.attacks=["fgsm","pgd"]', "--set", "eval.images=64", "--set", "eval.sweep_steps=2",
         "--set", "eval.pgd_steps=3", "--set", 'eval.noise_modes=["stochastic", "noise_off"]',
         "--set", 'export.noise_variants=["deterministic"]', "--set", "quantize.enabled=false",
         "--set", "bench.runs=10", "--set", "bench.warmup=2", "--set", 'bench.optimizations=["all"]',
         "--set", "bench.batches=[1]", "--set", "bench.threads=[1]"]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _ok(proc):
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _run(out: Path, *extra: str) -> list[str]:
    return ["run", "--config", "configs/smoke.toml", *BUDGET, *CHEAP, *extra, "--out", str(out)]


@pytest.fixture(scope="module")
def budgeted(cifar_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("budget") / "run"
    proc = _cli(*_run(out))
    _ok(proc)
    return out, json.loads((out / "manifest.json").read_text()), proc


def test_the_pruned_network_meets_the_mac_budget(budgeted):
    out, manifest, _ = budgeted
    surgery = manifest["stages"]["surgery"]["metrics"]
    assert surgery["macs_before"] / surgery["macs_after"] >= 2.0
    budget = manifest["stages"]["prune"]["metrics"]["budget"]
    assert budget["kind"] == "macs" and budget["macs_cost"] <= budget["limit"] == budget["dense"] / 2
    assert budget["macs_cost"] == surgery["macs_after"]          # the cost model counts what surgery left
    epochs = [json.loads(x) for x in (out / "prune" / "epochs.jsonl").read_text().splitlines()]
    assert all(e["cost_ratio"] >= 2.0 for e in epochs)            # every epoch-end projection is inside
    report = json.loads((out / "report.json").read_text())
    assert report["budget"]["cost_ratio"] >= 2.0 and "**Budget**: macs 2x less" in (out / "report.md").read_text()


def test_finetune_trains_resumes_after_kill_and_is_skipped_on_a_rerun(budgeted, tmp_path):
    ref, manifest, _ = budgeted
    assert manifest["stages"]["finetune"]["metrics"]["epochs"] == 4
    assert len((ref / "finetune" / "epochs.jsonl").read_text().splitlines()) == 4
    # kill -9 after the finetune stage's first checkpoint, rerun: it resumes and ends where the reference ended
    out = tmp_path / "killed"
    args = ["run", "--config", "configs/smoke.toml", *BUDGET, "--until", "finetune", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and not (out / ".finetune.resume" / "state.pt").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the finetune stage's first checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = _cli(*args)
    _ok(rerun)
    assert "[finetune] resuming after epoch" in rerun.stdout
    assert "[prune] skipped" in rerun.stdout
    killed = json.loads((out / "manifest.json").read_text())["stages"]["finetune"]["outputs"]
    assert killed["model_weights"]["sha256"] == manifest["stages"]["finetune"]["outputs"]["model_weights"]["sha256"]
    again = _cli(*args)
    _ok(again)
    assert "[finetune] skipped: up to date" in again.stdout


def test_baseline_trains_the_pruned_widths_from_scratch_beside(budgeted):
    ref, manifest, _ = budgeted
    proc = _cli("baseline", "--run", str(ref))
    _ok(proc)
    thin = json.loads((ref / "baseline" / "manifest.json").read_text())
    widths = thin["config"]["model"]["widths"]
    pruned_arch = json.loads((ref / "finetune" / "model.json").read_text())["shapes"]
    assert widths == {k: (v or []) for k, v in pruned_arch.items()} and widths
    assert thin["config"]["train"]["epochs"] == 2 + 2 + 4 and thin["config"]["prune"]["method"] == "none"
    thin_params = thin["stages"]["surgery"]["metrics"]["params_before"]
    assert thin_params == manifest["stages"]["surgery"]["metrics"]["params_after"]   # the same network, from scratch
    report = json.loads((ref / "report.json").read_text())
    assert [r["model"] for r in report["baseline"]["rows"]] == ["dense", "pruned", "thin from scratch"]
    assert "| thin from scratch |" in (ref / "report.md").read_text()


def test_a_latency_budget_is_met_and_a_cached_table_keeps_the_prune_stage(cifar_root, tmp_path):
    """budget = "latency" on the host: the table is measured once into the cache; a rerun of the latency stage that
    reads it from the cache reproduces its output, so the prune stage keeps its result."""
    out = tmp_path / "run"
    env_cache = {"PIPELINE_CACHE_DIR": str(tmp_path / "cache")}
    args = ["run", "--config", "configs/smoke.toml", "--set", "prune.groups=coupled", "--set", "prune.align=2",
            "--set", "prune.budget=latency", "--set", "prune.target=1.5", "--until", "prune", "--out", str(out)]

    def cli():
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env={**_env(), **env_cache},
                              capture_output=True, text=True, timeout=900)
    first = cli()
    _ok(first)
    assert "0 cached" in first.stdout and "to measure" in first.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    budget = manifest["stages"]["prune"]["metrics"]["budget"]
    assert budget["kind"] == "latency" and budget["latency_cost"] <= budget["limit"] == pytest.approx(
        budget["dense"] / 1.5)
    table = json.loads((out / "latency" / "table.json").read_text())
    assert table["used"] and table["units"] and table["full_ms"] > 0
    import shutil
    shutil.rmtree(out / "latency")                # its output gone: the stage reruns, from the cache
    again = cli()
    _ok(again)
    assert "0 to measure" in again.stdout and "[prune] skipped: up to date" in again.stdout
