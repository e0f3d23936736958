"""The train stage under torchrun: 2 gloo ranks on this CPU against the single-process run of the same config."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--config", "configs/smoke.toml", "--out",
                           str(out), "--until", "train", *extra], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def runs(cifar_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    single, ddp = _run(base / "single"), _run(base / "ddp", "--nproc", "2")
    for p in (single, ddp):
        assert p.returncode == 0, f"stdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return base, single, ddp


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def test_two_ranks_write_one_set_of_artifacts(runs):
    base, _, ddp = runs
    assert "DistributedDataParallel over 2 ranks: global batch 64" in ddp.stdout
    # rank 1 logs nothing and writes nothing: one train folder with the single run's files, one manifest
    assert ddp.stdout.count("[train] running") == 1
    files = lambda run: sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())  # noqa: E731
    assert files(base / "ddp") == files(base / "single")
    m = _manifest(base / "ddp")
    assert m["stages"]["train"]["status"] == "done" and m["stages"]["train"]["metrics"]["world_size"] == 2
    assert _manifest(base / "single")["stages"]["train"]["metrics"]["world_size"] == 1


def test_two_ranks_train_like_one_process(runs):
    """Same global batch and data order; BatchNorm statistics, EnResNet's noise scale and the attacks' random
    starts are per rank, so the runs differ a little. Stated tolerance: the last epoch's training loss within 5 %
    (relative) and the validation accuracies within 5 points."""
    base, _, _ = runs
    epochs = {name: [json.loads(x) for x in (base / name / "train" / "epochs.jsonl").read_text().splitlines()]
              for name in ("single", "ddp")}
    assert len(epochs["single"]) == len(epochs["ddp"]) == 2
    s, d = epochs["single"][-1], epochs["ddp"][-1]
    assert d["loss"] == pytest.approx(s["loss"], rel=0.05)
    for key in ("val_natural", "val_robust"):
        assert abs(d[key] - s[key]) <= 5.0, (key, d[key], s[key])


def test_nproc_inside_torchrun_is_refused(tmp_path, monkeypatch, capsys):
    from pipeline import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    code = cli.main(["run", "--config", "configs/smoke.toml", "--out", str(tmp_path / "x"), "--nproc", "2"])
    assert code == 2
    assert "already running under torchrun" in capsys.readouterr().err
