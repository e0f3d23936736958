"""The train and prune stages under torchrun: 2 gloo ranks on this CPU against the single-process run of the same
config."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(out: Path, *extra: str, until: str = "prune") -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--config", "configs/smoke.toml", "--out",
                           str(out), "--until", until, *extra], cwd=REPO, env=env, capture_output=True, text=True,
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
    assert ddp.stdout.count("[train] running") == 1 and ddp.stdout.count("[prune] running") == 1
    files = lambda run: sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())  # noqa: E731
    assert files(base / "ddp") == files(base / "single")
    m = _manifest(base / "ddp")
    for stage in ("train", "prune"):
        assert m["stages"][stage]["status"] == "done" and m["stages"][stage]["metrics"]["world_size"] == 2
        assert _manifest(base / "single")["stages"][stage]["metrics"]["world_size"] == 1


def _epochs(run: Path, stage: str) -> list[dict]:
    return [json.loads(x) for x in (run / stage / "epochs.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", ["train", "prune"])
def test_two_ranks_train_like_one_process(runs, stage):
    """Same global batch and data order; BatchNorm statistics, EnResNet's noise scale and the attacks' random
    starts are per rank, so the runs differ a little. Stated tolerance: the last epoch's training loss within 5 %
    (relative) and the validation accuracies within 5 points; for the prune stage (RGSM, a sparsifier step on
    every rank) also the channel sparsity within 5 points."""
    base, _, _ = runs
    single, ddp = _epochs(base / "single", stage), _epochs(base / "ddp", stage)
    assert len(single) == len(ddp) == 2
    s, d = single[-1], ddp[-1]
    assert d["loss"] == pytest.approx(s["loss"], rel=0.05)
    for key in ("val_natural", "val_robust"):
        assert abs(d[key] - s[key]) <= 5.0, (key, d[key], s[key])
    if stage == "prune":
        assert s["channel_sparsity"] > 0   # the smoke config prunes something, so the comparison means something
        assert abs(d["channel_sparsity"] - s["channel_sparsity"]) <= 5.0, (d["channel_sparsity"], s["channel_sparsity"])


def _processes_of(out: Path) -> list[int]:
    """Live processes whose command line names ``out`` (the launcher, torchrun, every rank)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(out) in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the ranks' parent-death signal is Linux's")
def test_kill_9_of_the_launcher_stops_every_rank_and_one_process_resumes(cifar_root, tmp_path):
    """kill -9 of `pipeline run --nproc 2` after the train stage's first checkpoint: torchrun and both ranks stop
    (torchrun starts each rank in a session of its own, so nothing else would stop them), the folder is free, and
    a rerun on ONE process resumes the 2-rank checkpoint and finishes the stage."""
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--config", "configs/smoke.toml", "--out", str(out),
           "--until", "train", "--set", "train.epochs=2", "--nproc", "2"]
    launcher = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob(".train.resume*/state.pt")):
            assert launcher.poll() is None and time.monotonic() < deadline, "no checkpoint from the 2-rank run"
            time.sleep(0.05)
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 30
        while _processes_of(out) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _processes_of(out), "ranks outlived their launcher"
    finally:
        launcher.kill()
    assert not (out / "train").exists()   # killed mid-stage: nothing published yet
    rerun = _run(out, "--set", "train.epochs=2", until="train")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "[train] resuming after epoch " in rerun.stdout
    assert _manifest(out)["stages"]["train"]["metrics"]["world_size"] == 1
    assert len(_epochs(out, "train")) == 2


def test_nproc_inside_torchrun_is_refused(tmp_path, monkeypatch, capsys):
    from pipeline import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    code = cli.main(["run", "--config", "configs/smoke.toml", "--out", str(tmp_path / "x"), "--nproc", "2"])
    assert code == 2
    assert "already running under torchrun" in capsys.readouterr().err
