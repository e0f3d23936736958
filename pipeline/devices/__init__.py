"""Where the ONNX artifacts are benchmarked: ``host``, ``aarch64-emu`` (the real aarch64 onnxruntime build in an
arm64 Debian root under qemu-user) and ``ssh://user@host[:port]`` (a remote board).

Every device runs the same self-contained script (``export/device_bench.py``) on a job folder holding the
artifacts, the input images and ``job.json``; it writes ``result.json`` there. A transport only moves that folder
and starts the script with the device's python: ``run(job_dir, device, timeout_s) -> Path`` of the result.
A transport failure is a ``DeviceError`` whose message is one line naming the device and what went wrong.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..errors import UserError

SCRIPT = Path(__file__).resolve().parents[2] / "export" / "device_bench.py"


class DeviceError(UserError, RuntimeError):
    """A device could not be reached or the benchmark failed on it."""


def kind_of(target: str) -> str:
    if target == "host":
        return "host"
    if target == "aarch64-emu":
        return "aarch64-emu"
    if target.startswith("ssh://"):
        return "ssh"
    raise ValueError(f"unknown device target {target!r}: expected host, aarch64-emu or ssh://user@host[:port]")


def device_name(dev) -> str:
    """The label a device's rows carry: its ``name`` or one derived from the target."""
    if dev.name:
        return dev.name
    if dev.target == "aarch64-emu":
        return f"aarch64-emu:{dev.qemu_cpu}"
    return dev.target


def write_job(job_dir: Path, models: dict[str, Path], inputs: np.ndarray, *, settings: list[dict],
              levels: list[str] | dict[str, list[str]], warmup: int, runs: int, seed: int, predict_batch: int = 50) -> Path:
    """A self-contained job folder: artifacts (hard links when possible), inputs.npy, job.json, the script."""
    job_dir.mkdir(parents=True, exist_ok=True)
    names = {}
    for name, src in models.items():
        dst = job_dir / f"{name}.onnx"
        if dst.exists():
            dst.unlink()
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        names[name] = dst.name
    np.save(job_dir / "inputs.npy", np.ascontiguousarray(inputs, dtype=np.float32))
    shutil.copyfile(SCRIPT, job_dir / "device_bench.py")
    job = {"models": names, "inputs": "inputs.npy", "predict_batch": predict_batch, "settings": settings,
           "levels": levels, "warmup": warmup, "runs": runs, "seed": seed}
    (job_dir / "job.json").write_text(json.dumps(job, indent=1))
    return job_dir / "job.json"


def _run_host(job_dir: Path, dev, timeout_s: float) -> Path:
    result = job_dir / "result.json"
    cmd = [sys.executable, str(job_dir / "device_bench.py"), str(job_dir / "job.json"), str(result)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"device {device_name(dev)}: benchmark did not finish within {timeout_s:.0f} s") from None
    if p.returncode != 0:
        raise DeviceError(f"device {device_name(dev)}: benchmark failed (exit {p.returncode}): {last_line(p.stderr)}")
    return result


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no error output"


def run_on_device(dev, job_dir: Path, *, timeout_s: float = 1800.0) -> dict:
    """Run the job in ``job_dir`` on ``dev``; the parsed result.json, or DeviceError."""
    kind = kind_of(dev.target)
    if kind == "host":
        path = _run_host(job_dir, dev, timeout_s)
    elif kind == "aarch64-emu":
        from . import aarch64_emu
        path = aarch64_emu.run(job_dir, dev, timeout_s)
    else:
        from . import ssh
        path = ssh.run(job_dir, dev, timeout_s)
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DeviceError(f"device {device_name(dev)}: unreadable result {path}: {e}") from None
