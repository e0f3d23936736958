"""Each pruning method end to end on the smoke config, and ``pipeline sweep``: one folder per grid point,
upstream stages shared by key, a table and plots, and a failed point that does not stop the others."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Keep these runs short: the paper's A2/A3 attacks on 64 images, a short latency sample, only the deterministic
# artifacts (the noise variants and int8 are tested in test_e2e_smoke.py).
CHEAP = ["--set", 'eval.attacks=["fgsm","ifgsm"]', "--set", "eval.images=64", "--set", "eval.sweep_steps=3",
         "--set", 'eval.noise_modes=["stochastic", "noise_off"]', "--set", 'export.noise_variants=["deterministic"]',
         "--set", "quantize.enabled=false",
         "--set", "bench.runs=10", "--set", "bench.warmup=2", "--set", 'bench.optimizations=["all"]',
         "--set", "bench.batches=[1]", "--set", "bench.threads=[1]"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


def _ok(proc) -> None:
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def sweep(cifar_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "methods"
    proc = _cli("sweep", "--config", "configs/smoke.toml", "--grid", "prune.method=rvsm,admm",
                "--set", "prune.rvsm.lam=1e-3", *CHEAP, "--out", str(out))
    _ok(proc)
    return out, json.loads((out / "sweep.json").read_text()), proc


def _point(sweep_json, name):
    return next(p for p in sweep_json["points"] if p["name"] == name)


def test_sweep_writes_one_run_per_point_with_table_and_plots(sweep):
    out, data, _ = sweep
    assert [p["name"] for p in data["points"]] == ["method=rvsm", "method=admm"]
    assert data["failed"] == 0 and all(p["status"] == "done" for p in data["points"])
    for p in data["points"]:
        assert (out / p["run_dir"] / "report.json").is_file()
        assert (out / p["run_dir"] / "prune" / "model.pt").is_file()
    md = (out / "sweep.md").read_text()
    assert "| method=rvsm | En2 test_resnet | rvsm |" in md and "| method=admm | En2 test_resnet | admm |" in md
    for png in data["plots"].values():
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_shares_the_train_stage(sweep):
    out, data, proc = sweep
    first, second = data["points"]
    assert first["shared_stages"] == [] and second["shared_stages"] == ["train"]
    assert proc.stdout.count("[train] running") == 1
    a, b = (out / p["run_dir"] / "train" / "model.pt" for p in (first, second))
    assert os.stat(a).st_ino == os.stat(b).st_ino or a.read_bytes() == b.read_bytes()
    manifest = json.loads((out / second["run_dir"] / "manifest.json").read_text())
    assert manifest["stages"]["train"]["shared_from"].endswith("method=rvsm")
    # prune differs by method, so it ran in both
    assert "shared_from" not in manifest["stages"]["prune"]


def test_rvsm_gives_unstructured_sparsity(sweep):
    _, data, _ = sweep
    rvsm = _point(data, "method=rvsm")
    assert rvsm["weight_sparsity"] > 5.0           # exact zeros among conv weights
    assert rvsm["channel_sparsity"] == 0.0         # ...scattered, not whole channels


def test_admm_final_projection_makes_it_sparse(sweep):
    out, data, _ = sweep
    admm = _point(data, "method=admm")
    # every layer keeps its top 20 % by |w| (ties aside), so about 80 % of conv weights are zero
    assert 78.0 <= admm["weight_sparsity"] <= 81.0
    prune = json.loads((out / admm["run_dir"] / "manifest.json").read_text())["stages"]["prune"]["metrics"]
    assert prune["before_final_projection"]["weight_sparsity"] < 5.0   # what the reference code reported


def test_admm_channel_and_rgsm_soft_prune_channels(sweep, tmp_path):
    out, data, _ = sweep
    donor = out / _point(data, "method=rvsm")["run_dir"]
    for name, sets in (("admm_channel", ["prune.method=admm", "prune.admm.sparsity=channel", "prune.admm.percentile=50"]),
                       ("rgsm_soft", ["prune.method=rgsm", "prune.rgsm.prox=soft"])):
        run = tmp_path / name
        proc = _cli("run", "--config", "configs/smoke.toml", *[x for s in sets for x in ("--set", s)],
                    "--set", "prune.rvsm.lam=1e-3", *CHEAP, "--share-from", str(donor), "--out", str(run))
        _ok(proc)
        assert "[train] shared: finished with the same key" in proc.stdout
        report = json.loads((run / "report.json").read_text())
        pruned = report["models"][1]
        assert pruned["channel_sparsity"] > 0, name
        assert pruned["channel_weight_sparsity"] > 0 and pruned["weight_sparsity"] >= pruned["channel_weight_sparsity"]
        if name == "admm_channel":   # per layer, half the input channels (at or below the median norm) go
            assert 45.0 <= pruned["channel_sparsity"] <= 60.0


def test_a_failed_point_is_reported_and_the_rest_run(cifar_root, tmp_path):
    out = tmp_path / "failing"
    # lr 1e12 makes the prune stage's loss non-finite; the second point is fine and shares the train stage
    proc = _cli("sweep", "--config", "configs/smoke.toml", "--grid", "prune.lr=1e12,0.05", *CHEAP,
                "--out", str(out))
    assert proc.returncode == 1
    assert "1 of 2 sweep points failed" in proc.stderr and "Traceback" not in proc.stderr
    data = json.loads((out / "sweep.json").read_text())
    bad, good = data["points"]
    assert bad["status"] == "failed" and "TrainingDiverged" in bad["error"]
    assert good["status"] == "done" and good["shared_stages"] == ["train"]
    assert "**failed**" in (out / "sweep.md").read_text()


def test_bad_grid_fails_before_running_anything(tmp_path):
    out = tmp_path / "bad"
    proc = _cli("sweep", "--config", "configs/smoke.toml", "--grid", "prune.rgsm.lambda1=0.1,-1", "--out", str(out))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "pipeline: error: --grid point prune.rgsm.lambda1=-1: prune.rgsm.lambda1: expected >= 0, got -1.0"]
    assert not (out / "points").exists()
    proc = _cli("sweep", "--config", "configs/smoke.toml", "--grid", "prune.nope=1,2", "--out", str(out))
    assert proc.returncode == 2 and "--grid point prune.nope=1: unknown key 'prune.nope'" in proc.stderr
