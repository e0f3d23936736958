"""The /proc/cpuinfo trap: qemu 7.2 shows the guest the host's x86 /proc/cpuinfo, on which ``import onnxruntime``
segfaults. ``write_cpuinfo`` puts an ARM-format cpuinfo at ROOT/proc/cpuinfo whose ``Features`` are the emulated
CPU's HWCAPs, read in the guest with getauxval and cached in the root per CPU model and qemu version."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
from pathlib import Path

from ...core.files import atomic_write_text
from .. import DeviceError, last_line
from . import guest

# Run in the guest: the emulated CPU's HWCAP names, in the kernel's /proc/cpuinfo order (AT_HWCAP, AT_HWCAP2 bits).
_HWCAP_PY = r"""
import ctypes
libc = ctypes.CDLL(None)
libc.getauxval.restype = ctypes.c_ulong
h1, h2 = libc.getauxval(16), libc.getauxval(26)
n1 = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 "
      "sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()
n2 = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm svebf16 i8mm "
      "bf16 dgh rng bti mte ecv afp rpres mte3 sme sme_i16i64 sme_f64f64 sme_i8i32 sme_f16f32 sme_b16f32 sme_f32f32 "
      "sme_fa64 wfxt ebf16 sve_ebf16 cssc rprfm sve2p1 sme2 sme2p1 sme_i16i32 sme_bi32i32 sme_b16b16 sme_f16f16 mops "
      "hbc").split()
print(" ".join([n for i, n in enumerate(n1) if h1 >> i & 1] + [n for i, n in enumerate(n2) if h2 >> i & 1]))
"""


def cpuinfo_text(features: str, part: str, ncpu: int) -> str:
    """/proc/cpuinfo as an arm64 Linux kernel writes it (one block per core)."""
    block = ("processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: {f}\nCPU implementer\t: 0x41\n"
             "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: {p}\nCPU revision\t: 0\n\n")
    return "".join(block.format(i=i, f=" ".join(features.split()), p=part) for i in range(max(1, ncpu)))


def hwcaps(root: Path, qemu_cpu: str, *, qemu: str = guest.QEMU) -> str:
    """The HWCAP feature names qemu gives ``qemu_cpu``, read in the guest once and cached in the root."""
    guest.check_cpu(qemu_cpu)
    version = guest.qemu_version(qemu)
    cache = Path(root) / guest.STATE / f"hwcap-{qemu_cpu}.json"
    try:
        data = json.loads(cache.read_text())
        if data.get("qemu") == version and data.get("features"):
            return data["features"]
    except (OSError, ValueError, AttributeError):
        pass
    try:
        p = guest.run_guest(root, ["-c", _HWCAP_PY], qemu_cpu, timeout=120, qemu=qemu)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"device aarch64-emu:{qemu_cpu}: reading the emulated CPU's HWCAPs timed out") from None
    features = (p.stdout or "").strip().splitlines()
    if p.returncode != 0 or not features or "fp" not in features[-1].split():
        raise DeviceError(f"device aarch64-emu:{qemu_cpu}: {guest.QEMU} could not run the arm64 python in {root} "
                          f"(exit {p.returncode}): {last_line(p.stderr)}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps({"qemu": version, "qemu_cpu": qemu_cpu, "features": features[-1]}), mode=0o644)
    return features[-1]


def real_proc_dir(root: Path) -> Path:
    """ROOT/proc as a real directory inside the root (debootstrap may leave a symlink to the host's /proc)."""
    root = Path(root)
    proc = root / "proc"
    if proc.is_symlink():
        proc.unlink()                       # the link only: never write through it into the host's /proc
    if guest.is_mountpoint(proc):
        raise DeviceError(f"device aarch64-emu: {proc} is a mount point (a procfs?); unmount it first")
    proc.mkdir(parents=True, exist_ok=True)
    real_root, real_proc = os.path.realpath(root), os.path.realpath(proc)
    if os.path.dirname(real_proc) != real_root:
        raise DeviceError(f"device aarch64-emu: {proc} resolves outside the root ({real_proc}); not writing there")
    return proc


def write_cpuinfo(root: Path, qemu_cpu: str, *, ncpu: int | None = None) -> Path:
    """Write ROOT/proc/cpuinfo for ``qemu_cpu`` (HWCAPs read in the guest, cached per CPU model); its path."""
    guest.check_cpu(qemu_cpu)
    text = cpuinfo_text(hwcaps(root, qemu_cpu), guest.CPUS[qemu_cpu], ncpu or os.cpu_count() or 1)
    path = real_proc_dir(root) / "cpuinfo"
    if not (path.is_file() and path.read_text() == text):
        atomic_write_text(path, text, mode=0o644)
    return path


@contextlib.contextmanager
def cpuinfo_for(root: Path, qemu_cpu: str):
    """Hold ROOT/proc/cpuinfo at ``qemu_cpu``'s text for the block: runs of one CPU model share it (shared lock);
    a run of another model waits until they are done, then rewrites it (exclusive lock)."""
    text = cpuinfo_text(hwcaps(root, qemu_cpu), guest.CPUS[qemu_cpu], os.cpu_count() or 1)
    path = real_proc_dir(root) / "cpuinfo"
    lock_path = Path(root) / guest.STATE / "cpuinfo.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as lock:
        while True:
            fcntl.flock(lock, fcntl.LOCK_SH)
            if path.is_file() and path.read_text() == text:
                break
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(lock, fcntl.LOCK_EX)
            atomic_write_text(path, text, mode=0o644)
            fcntl.flock(lock, fcntl.LOCK_UN)  # loop: take the shared lock and check again
        try:
            yield path
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


