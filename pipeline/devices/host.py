"""``host``: the job runs in a subprocess of this machine's python (the reference every other device is compared
with)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..catalog.devices import device_name
from . import DeviceError, last_line


def run(job_dir: Path, dev, timeout_s: float) -> Path:
    result = job_dir / "result.json"
    cmd = [sys.executable, str(job_dir / "device_bench.py"), str(job_dir / "job.json"), str(result)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"device {device_name(dev)}: benchmark did not finish within {timeout_s:.0f} s") from None
    if p.returncode != 0:
        raise DeviceError(f"device {device_name(dev)}: benchmark failed (exit {p.returncode}): {last_line(p.stderr)}")
    return result
