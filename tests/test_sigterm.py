"""SIGTERM (``kill``, a scheduler's stop, ``docker stop``) is handled as Ctrl-C, in every stage: one line on stderr
and exit 2, no temporary stage folder (``RUN/.<stage>.tmp``) and no child process left behind, the mid-stage
checkpoints (``RUN/.<stage>.resume``) kept, and the same command resumes -- finished stages skipped, train and prune
continuing after their last epoch checkpoint.

One chain, to stay cheap: run the smoke config, kill it in the first stage; rerun the same command, kill it in the
next stage; ... until every stage was killed once; then a last rerun finishes. The config is made cheap but keeps
every stage doing real work: the latency stage measures a table (``prune.budget = "latency"``, exports and a device
subprocess), finetune trains one epoch, and train and prune are killed after their first epoch checkpoint."""
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHEAP = ["--set", "prune.groups=coupled", "--set", "prune.align=2", "--set", "prune.budget=latency",
         "--set", "prune.target=1.5", "--set", "finetune.epochs=1",
         "--set", 'eval.attacks=["fgsm", "pgd"]', "--set", "eval.images=64", "--set", "eval.sweep_steps=2",
         "--set", "eval.pgd_steps=3", "--set", 'eval.noise_modes=["stochastic", "noise_off"]',
         "--set", 'export.noise_variants=["deterministic"]', "--set", "bench.runs=10", "--set", "bench.warmup=2",
         "--set", 'bench.optimizations=["all"]', "--set", "bench.batches=[1]", "--set", "bench.threads=[1]"]
# stages that checkpoint after every epoch (smoke.toml: 2 epochs each, so one checkpoint, after epoch 1)
RESUMABLE = ("train", "prune")
INTERRUPTED = "pipeline: error: interrupted (SIGTERM); finished stages are kept, rerun the same command to resume"
TIMEOUT = 240


class Child:
    """``pipeline run`` in a session of its own, its stdout and stderr read line by line by two threads."""

    def __init__(self, cmd: list[str], env: dict):
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout, True), daemon=True),
                        threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr, False), daemon=True)]
        for t in self.readers:
            t.start()

    def _read(self, stream, into: list, forward: bool) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))
            if forward:
                self.lines.put(line.rstrip("\n"))
        if forward:
            self.lines.put(None)

    def wait_for(self, prefix: str, deadline: float) -> None:
        while True:
            line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            assert line is not None, f"ended before a line starting {prefix!r}:\n{self.explain()}"
            if line.startswith(prefix):
                return

    def finish(self) -> int:
        rc = self.proc.wait(timeout=TIMEOUT)
        for t in self.readers:
            t.join(timeout=30)
        return rc

    def explain(self) -> str:
        return "stdout:\n" + "\n".join(self.stdout[-40:]) + "\nstderr:\n" + "\n".join(self.stderr[-40:])


def _session_processes(sid: int) -> list[str]:
    """The live processes (zombies aside) of session ``sid``: the run's children outlive it only if orphaned."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()   # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(text[:text.rindex(")") + 1])
    return found


def _no_orphans(sid: int) -> list[str]:
    deadline = time.monotonic() + 10
    while (left := _session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_sigterm_in_every_stage_is_one_line_and_the_rerun_resumes(cifar_root, tmp_path):
    from pipeline.stages import STAGES

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--config", "configs/smoke.toml", "--out", str(out), *CHEAP]
    # the latency stage's timing cache in the test's folder: every chain measures (and is killed) afresh
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PIPELINE_CACHE_DIR=str(tmp_path / "cache"))
    names = [s.name for s in STAGES]
    killed: list[str] = []
    last = None
    for stage in names + [None]:   # each stage killed once, in order; then a run that finishes
        child = Child(cmd, env)
        deadline = time.monotonic() + TIMEOUT
        if stage is not None:
            child.wait_for(f"[{stage}] running", deadline)
            # in the stage: its temporary folder exists (a SIGTERM right after the line may land before the
            # runner made it, where there is nothing to clean up or to check); train and prune: after their
            # first epoch checkpoint, so that the rerun has something to resume
            ready = out / (f".{stage}.resume/state.pt" if stage in RESUMABLE else f".{stage}.tmp")
            while not ready.exists() and child.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.001)
            assert ready.exists(), f"[{stage}] made no {ready}\n{child.explain()}"
            child.proc.send_signal(signal.SIGTERM)
        rc = child.finish()
        stdout = child.stdout
        if last is not None:   # the rerun after a kill: what finished is kept, the killed stage resumes
            for done in names[:names.index(last)]:
                assert any(line.startswith(f"[{done}] skipped: up to date") for line in stdout), \
                    f"killed in {last}: {done} was not kept\n{child.explain()}"
            assert any(line.startswith(f"[{last}] running") for line in stdout), child.explain()
            if last in RESUMABLE:
                assert any(line.startswith(f"[{last}] resuming after epoch 1/") for line in stdout), child.explain()
        assert not list(out.rglob("*.tmp")), f"left behind: {list(out.rglob('*.tmp'))}"
        assert not _no_orphans(child.proc.pid), f"orphaned: {_session_processes(child.proc.pid)}"
        if stage is None:
            assert rc == 0, child.explain()
            break
        assert rc == 2, child.explain()
        assert child.stderr == [INTERRUPTED], child.explain()
        entry = json.loads((out / "manifest.json").read_text())["stages"].get(stage, {})
        assert entry.get("status") != "done" and \
            entry.get("last_failure", {}).get("error", "").startswith("KeyboardInterrupt"), \
            f"the SIGTERM did not land in {stage}: {entry}\n{child.explain()}"
        if stage in RESUMABLE:
            assert (out / f".{stage}.resume" / "state.pt").is_file()   # the checkpoint stays, as after Ctrl-C
        killed.append(stage)
        last = stage
    assert killed == names
    assert (out / "report.md").is_file()
    assert not list(out.glob(".*.resume")), "a finished stage keeps no mid-stage checkpoint"
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(manifest["stages"][s]["status"] == "done" for s in names)
