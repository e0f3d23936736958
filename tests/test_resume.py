"""kill -9 in the middle of training: the rerun continues from the last epoch checkpoint and ends bit-identical
(weights, epoch logs, metrics) to a run that was never interrupted (CPU, fixed seed, one thread)."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Long enough to be killed several times: 5 train + 3 prune epochs of the smoke model, stopping after prune.
ARGS = ["--config", "configs/smoke.toml", "--until", "prune", "--set", "train.epochs=5", "--set", "prune.epochs=3"]
TIMING = {"images_per_s", "seconds", "train_images_per_s"}


def _command(out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "run", *ARGS, "--out", str(out)]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _checkpoints(out: Path) -> dict[str, float]:
    return {s: (out / f".{s}.resume" / "state.pt").stat().st_mtime_ns
            for s in ("train", "prune") if (out / f".{s}.resume" / "state.pt").is_file()}


def _result(out: Path) -> dict:
    """Everything that must not depend on interruptions: output hashes, epoch logs and metrics without timings."""
    manifest = json.loads((out / "manifest.json").read_text())
    result = {}
    for stage in ("train", "prune"):
        entry = manifest["stages"][stage]
        assert entry["status"] == "done"
        logs = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
                for line in (out / stage / "epochs.jsonl").read_text().splitlines()]
        result[stage] = {"outputs": {k: v["sha256"] for k, v in entry["outputs"].items() if k != "epochs_log"},
                         "epochs": logs, "metrics": {k: v for k, v in entry["metrics"].items() if k not in TIMING}}
    return result


def test_sigkill_at_random_points_then_resume_is_bit_identical(cifar_root, tmp_path):
    reference = tmp_path / "reference"
    done = subprocess.run(_command(reference), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (reference / ".train.resume").exists() and not (reference / ".prune.resume").exists()

    seed = random.randrange(10**6)
    rng = random.Random(seed)
    out, logs, kills = tmp_path / "killed", [], 0
    for attempt in range(3):
        before = _checkpoints(out)
        proc = subprocess.Popen(_command(out), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        # wait for a new checkpoint (so that there is something to resume), then kill at a random moment after it
        deadline = time.monotonic() + 300
        while proc.poll() is None and _checkpoints(out) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 2.5))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        logs.append(proc.communicate(timeout=60)[0])
    final = subprocess.run(_command(out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    logs.append(final.stdout)
    resumed = sum(log.count("resuming after epoch") for log in logs)
    assert kills >= 2 and resumed >= 2, f"seed {seed}: {kills} kills, {resumed} resumes -- the test exercised nothing"
    assert _result(out) == _result(reference), f"seed {seed}: the resumed run differs from the uninterrupted one"
    assert not (out / ".train.resume").exists() and not (out / ".prune.resume").exists()


def test_a_checkpoint_of_other_settings_is_never_resumed(cifar_root, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_command(out), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and "train" not in _checkpoints(out) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / ".train.resume" / "state.pt").is_file()
    # another learning rate is another train key: the checkpoint is discarded, the stage starts from epoch 1
    rerun = subprocess.run(_command(out)[:-2] + ["--set", "train.lr=0.05", "--out", str(out), "--until", "train"],
                           cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming" not in rerun.stdout
    assert len((out / "train" / "epochs.jsonl").read_text().splitlines()) == 5
