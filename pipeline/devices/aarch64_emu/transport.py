"""The ``aarch64-emu`` transport: a bench job run under qemu-user with the root's python."""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from ...catalog.devices import device_name
from .. import DeviceError, last_line
from . import cpuinfo, guest


def run(job_dir: Path, dev, timeout_s: float) -> Path:
    """Run ``device_bench.py`` of ``job_dir`` under qemu with the root's python; the path of result.json."""
    name = device_name(dev)
    guest.check_cpu(dev.qemu_cpu)
    root = guest.root_of(dev)
    if guest.read_stamp(root) is None:
        raise guest.missing_root_error(dev, root)
    qemu = guest.qemu_bin(name)
    job_dir = Path(job_dir).resolve()
    result = job_dir / "result.json"
    # -L looks every absolute path up under ROOT first: a file of the job shadowed there would be read instead
    for p in [*job_dir.iterdir(), result]:
        shadow = Path(str(root) + str(p))
        if os.path.lexists(shadow):
            raise DeviceError(f"device {name}: {shadow} exists in the arm64 root and would hide the job's {p} "
                              "from the guest; use a job folder outside such paths")
    with contextlib.suppress(FileNotFoundError):
        result.unlink()
    args = [str(job_dir / "device_bench.py"), str(job_dir / "job.json"), str(result)]
    with cpuinfo.cpuinfo_for(root, dev.qemu_cpu):
        try:
            p = guest.run_guest(root, args, dev.qemu_cpu, timeout=timeout_s, cwd=job_dir, qemu=qemu)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"device {name}: benchmark did not finish within {timeout_s:.0f} s under emulation "
                              "(~500x slower than native: lower runs/batches for this device or raise its "
                              "timeout_s)") from None
    if p.returncode != 0:
        raise DeviceError(f"device {name}: benchmark failed under qemu (exit {p.returncode}): {last_line(p.stderr)}")
    if not result.is_file():
        raise DeviceError(f"device {name}: the benchmark exited 0 but wrote no {result}")
    return result


