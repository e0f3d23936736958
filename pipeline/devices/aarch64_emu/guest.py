"""How the arm64 guest runs: the root's paths and stamp, and the qemu-user command line with its clean
environment (see the package docstring).

Other modules of this package call these through the module (``guest.run_guest(...)``), so a test can stand one in."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from ...catalog.devices import device_name
from ...core.paths import HomeMissing, home_cache
from .. import DeviceError

QEMU = "qemu-aarch64-static"
SUITE = "bookworm"
SITE = "/opt/ortsite"                      # guest path of the pip --target folder
STAMP = ".pipeline-aarch64-root.json"      # written last: its presence marks a finished root
STAMP_FORMAT = 1
STATE = "var/lib/pipeline"                 # per-root cache (HWCAPs per CPU model) and the cpuinfo lock
# QEMU CPU model -> MIDR part number for the fake /proc/cpuinfo (implementer 0x41 = Arm)
CPUS = {"cortex-a72": "0xd08", "cortex-a76": "0xd0b", "neoverse-n1": "0xd0c", "max": "0xd4f"}


def default_root() -> Path:
    """$PIPELINE_ARM_ROOT, else ~/.cache/pipeline/aarch64-root (HomeMissing without a home folder)."""
    return home_cache("PIPELINE_ARM_ROOT", "aarch64-root", what="arm64 root",
                      hint="its folder (or pass --root, or set root in [[bench.devices]])").absolute()


def root_of(dev) -> Path:
    """The device's arm64 root: ``dev.root`` if set, else :func:`default_root`."""
    # absolute: the guest runs with the job folder as its working directory
    if getattr(dev, "root", ""):
        return Path(dev.root).expanduser().absolute()
    try:
        return default_root()
    except HomeMissing as e:   # as a missing root: this device's rows fail, the run goes on
        raise DeviceError(f"device {device_name(dev)}: {e}") from None


def check_cpu(qemu_cpu: str) -> str:
    if qemu_cpu not in CPUS:
        raise DeviceError(f"device aarch64-emu:{qemu_cpu}: unknown qemu_cpu {qemu_cpu!r}; expected one of "
                          f"{', '.join(CPUS)} (cortex-a72 = NEON, cortex-a76/neoverse-n1 = NEON+dotprod, "
                          "max = SVE2/i8mm/bf16/SME)")
    return qemu_cpu


def read_stamp(root: Path) -> dict | None:
    """The stamp of a finished root, or None (absent, unreadable, or the root's files are not all there)."""
    try:
        stamp = json.loads((Path(root) / STAMP).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("format") != STAMP_FORMAT:
        return None
    if not (Path(root) / "usr/bin/python3").exists() or not (Path(root) / SITE.lstrip("/") / "onnxruntime").is_dir():
        return None
    return stamp


def missing_root_error(dev, root: Path) -> DeviceError:
    try:
        default = root == default_root()
    except HomeMissing:
        default = False
    return DeviceError(f"device {device_name(dev)}: no arm64 root at {root}; run "
                       f"`pipeline device setup aarch64-emu{'' if default else f' --root {root}'}`")


# ------------------------------------------------------------------------------------------- command construction
def qemu_argv(root: Path, args: list[str], qemu: str = QEMU) -> list[str]:
    """argv running the root's python3 under qemu-user with ``-L ROOT`` (absolute paths looked up in ROOT first)."""
    return [qemu, "-L", str(root), str(Path(root) / "usr/bin/python3"), *args]


def guest_env(qemu_cpu: str, *, base: dict | None = None) -> dict[str, str]:
    """A clean environment for the guest: PATH, HOME, LANG, the qemu CPU model, the onnxruntime site folder."""
    base = os.environ if base is None else base
    env = {"PATH": "/usr/bin:/bin", "HOME": base.get("HOME") or "/root", "LANG": "C.UTF-8",
           "QEMU_CPU": qemu_cpu, "PYTHONPATH": SITE, "PYTHONNOUSERSITE": "1", "PIPELINE_EMULATED": "1"}
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):   # numpy's OpenBLAS in the guest: keep the caller's cap
        if base.get(k):
            env[k] = base[k]
    return env


def qemu_bin(dev_label: str) -> str:
    path = shutil.which(QEMU)
    if not path:
        raise DeviceError(f"device {dev_label}: {QEMU} not found; run `apt-get install -y qemu-user-static` "
                          "(as root) or `pipeline device setup aarch64-emu`")
    return path


def qemu_version(qemu: str | None = None) -> str:
    try:
        p = subprocess.run([qemu or QEMU, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    first = (p.stdout or "").strip().splitlines()
    return first[0].replace("qemu-aarch64 version ", "") if first else "unknown"


def run_guest(root: Path, args: list[str], qemu_cpu: str, *, timeout: float, cwd: Path | None = None,
              qemu: str = QEMU) -> subprocess.CompletedProcess:
    return subprocess.run(qemu_argv(root, args, qemu), env=guest_env(qemu_cpu), cwd=str(cwd) if cwd else None,
                          capture_output=True, text=True, timeout=timeout)


def mounts_under(path: Path) -> list[str]:
    base = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].encode().decode("unicode_escape")
                if mp == base or mp.startswith(base + "/"):
                    found.append(mp)
    except OSError:
        pass
    return found


def is_mountpoint(path: Path) -> bool:
    return os.path.lexists(path) and not os.path.islink(path) and os.path.ismount(path)
