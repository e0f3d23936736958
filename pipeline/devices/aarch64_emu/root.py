"""``pipeline device setup aarch64-emu``: build the arm64 root once -- debootstrap stage 1 only (host native, no
emulated stage 2), every downloaded .deb unpacked with ``dpkg-deb -x``, and the PyPI aarch64 wheels of onnxruntime
(the host's version) and numpy installed from the host with ``pip install --target ROOT/opt/ortsite`` (this
interpreter's pip, else ``uv pip``, else a pip on PATH: :func:`wheel_installer`). Built in a temp folder and renamed;
a stamp written last marks a finished root, which the next setup reuses."""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ...core.files import atomic_write_text
from .. import DeviceError, last_line
from . import cpuinfo, guest

APT_PACKAGES = {guest.QEMU: "qemu-user-static", "debootstrap": "debootstrap"}
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
PIP_PLATFORM = "manylinux_2_28_aarch64"      # pip --platform
UV_PLATFORM = "aarch64-manylinux_2_28"       # uv pip --python-platform: the same wheel tags

_PROBE_PY = r"""
import json, platform, sys
import numpy, onnxruntime
print(json.dumps({"machine": platform.machine(), "python": platform.python_version(), "numpy": numpy.__version__,
                  "onnxruntime": onnxruntime.__version__, "providers": onnxruntime.get_available_providers()}))
"""


def binfmt_status() -> str:
    """What binfmt_misc says about qemu-aarch64 (informational: the explicit ``qemu -L`` route never needs it)."""
    entry = BINFMT_DIR / "qemu-aarch64"
    if entry.exists():
        try:
            state = entry.read_text().splitlines()[0].strip()
        except (OSError, IndexError):
            state = "unreadable"
        what = f"qemu-aarch64 registered ({state})"
    elif (BINFMT_DIR / "register").exists():
        what = "binfmt_misc mounted, qemu-aarch64 not registered"
    else:
        what = "binfmt_misc not mounted"
    return f"{what}; not needed (explicit qemu route)"


def host_versions(ort_version: str | None = None) -> dict[str, str]:
    import numpy
    if ort_version is None:
        import onnxruntime
        ort_version = onnxruntime.__version__
    return {"onnxruntime": ort_version, "numpy": numpy.__version__}


def _ensure_tools(log) -> None:
    """qemu-user-static and debootstrap on the host: installed with apt when missing and running as root."""
    missing = sorted({pkg for exe, pkg in APT_PACKAGES.items() if shutil.which(exe) is None})
    if not missing:
        return
    cmd = f"apt-get update && apt-get install -y {' '.join(missing)}"
    if os.geteuid() != 0:
        raise DeviceError(f"device aarch64-emu: setup needs the apt package(s) {', '.join(missing)}; "
                          f"run `sudo sh -c '{cmd}'` and then `pipeline device setup aarch64-emu` again")
    log(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    t = time.perf_counter()
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *missing]):
        p = subprocess.run(argv, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise DeviceError(f"device aarch64-emu: `{' '.join(argv)}` failed (exit {p.returncode}): "
                              f"{last_line(p.stderr)}")
    log(f"  apt-get update + install: {time.perf_counter() - t:.1f}s")
    still = [pkg for exe, pkg in APT_PACKAGES.items() if shutil.which(exe) is None]
    if still:
        raise DeviceError(f"device aarch64-emu: apt-get installed {' '.join(missing)} but "
                          f"{', '.join(still)} is still not on PATH")


def _remove_tree(path: Path) -> None:
    """rm -rf that refuses to descend into anything mounted below ``path`` (debootstrap may bind-mount /dev)."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
        return
    mounts = guest.mounts_under(path)
    if mounts:
        raise DeviceError(f"device aarch64-emu: refusing to delete {path}: {mounts[0]} is mounted there; "
                          f"unmount it (umount -R {mounts[0]}) first")
    shutil.rmtree(path)        # never follows symlinks (ROOT/proc -> /proc is unlinked, not emptied)


def _du_mb(path: Path) -> float:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for n in filenames:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, n))
                total += st.st_blocks * 512
    return round(total / 2**20, 1)


def _step(argv: list[str], what: str, log_file: Path, *, timeout: float = 1800, env=None) -> None:
    with open(log_file, "a") as log:
        log.write(f"\n$ {' '.join(argv)}\n")
        log.flush()
        try:
            p = subprocess.run(argv, stdout=log, stderr=subprocess.PIPE, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"device aarch64-emu: {what} did not finish within {timeout:.0f} s "
                              f"(log: {log_file})") from None
        log.write(p.stderr or "")
    if p.returncode != 0:
        raise DeviceError(f"device aarch64-emu: {what} failed (exit {p.returncode}): {last_line(p.stderr)} "
                          f"(log: {log_file})")


def _build_root(tmp: Path, versions: dict[str, str], log, log_file: Path) -> None:
    """The fast route into the empty folder ``tmp``: debootstrap stage 1, dpkg-deb -x, host-side pip --target."""
    mirror = os.environ.get("PIPELINE_DEBIAN_MIRROR", "").strip() or "http://deb.debian.org/debian"
    t = time.perf_counter()
    _step(["debootstrap", "--arch=arm64", "--foreign", "--variant=minbase", "--include=python3", guest.SUITE, str(tmp),
           mirror], f"debootstrap (arm64 {guest.SUITE} from {mirror})", log_file)
    mounts = guest.mounts_under(tmp)
    if mounts:
        raise DeviceError(f"device aarch64-emu: debootstrap left {mounts[0]} mounted; unmount it "
                          f"(umount -R {mounts[0]}) and rerun setup")
    debs = sorted((tmp / "var/cache/apt/archives").glob("*.deb"))
    if not debs:
        raise DeviceError(f"device aarch64-emu: debootstrap downloaded no packages into {tmp} (log: {log_file})")
    log(f"  debootstrap stage 1: {time.perf_counter() - t:.1f}s, {len(debs)} packages")
    t = time.perf_counter()
    for deb in debs:
        _step(["dpkg-deb", "-x", str(deb), str(tmp)], f"dpkg-deb -x {deb.name}", log_file)
    for deb in debs:            # unpacked; the .debs themselves are not needed at run time
        deb.unlink()
    cpuinfo.real_proc_dir(tmp)         # stage 1 leaves ROOT/proc -> /proc (the host's, seen from outside a chroot)
    pythons = sorted(p.name for p in (tmp / "usr/bin").glob("python3.*") if p.name[8:].isdigit())
    if not pythons:
        raise DeviceError(f"device aarch64-emu: no python3.X in {tmp / 'usr/bin'} after unpacking (log: {log_file})")
    pyver = pythons[-1][len("python"):]
    log(f"  dpkg-deb -x: {time.perf_counter() - t:.1f}s (python {pyver})")
    t = time.perf_counter()
    installer = wheel_installer(sys.executable)
    tool = "uv pip" if _is_uv(installer) else "pip"
    _step(wheel_install_argv(installer, tmp / guest.SITE.lstrip("/"), pyver, versions, python=sys.executable),
          f"{tool} install of the aarch64 wheels onnxruntime=={versions['onnxruntime']} numpy=={versions['numpy']}",
          log_file)
    log(f"  {tool} --target (aarch64 wheels): {time.perf_counter() - t:.1f}s")


def _pip_importable() -> bool:
    return importlib.util.find_spec("pip") is not None


def wheel_installer(python: str, *, which=None, has_pip=None) -> list[str]:
    """The command prefix that fetches the aarch64 wheels, from what this host has: ``python -m pip`` when pip is
    importable in ``python`` (this interpreter), else ``uv pip`` (uv on PATH), else a ``pip3``/``pip`` on PATH (any
    pip downloads foreign-platform wheels with --platform/--python-version/--only-binary/--target, whichever Python
    it belongs to). None of them: a one-line DeviceError saying how to get pip (a uv-made venv has none).
    ``which`` (shutil.which) and ``has_pip`` (is pip importable here) are looked up at call time unless given."""
    which = which or shutil.which
    if (has_pip or _pip_importable)():
        return [python, "-m", "pip"]
    uv = which("uv")
    if uv:
        return [uv, "pip"]
    for name in ("pip3", "pip"):
        pip = which(name)
        if pip:
            return [pip]
    raise DeviceError(f"device aarch64-emu: no pip found to fetch the aarch64 wheels: {python} has no pip module "
                      f"(a uv-made venv has none) and there is no uv, pip3 or pip on PATH; get pip with "
                      f"`{python} -m ensurepip` (or `uv pip install --python {python} pip`) and rerun "
                      "`pipeline device setup aarch64-emu`")


def _is_uv(installer: list[str]) -> bool:
    return installer[1:] == ["pip"]          # [uv, "pip"]; pip is [python, "-m", "pip"] or [pip]


def wheel_install_argv(installer: list[str], target: Path, pyver: str, versions: dict[str, str], *,
                       python: str) -> list[str]:
    """The full command installing the pinned aarch64 onnxruntime and numpy wheels for CPython ``pyver`` (the
    root's "3.11") into ``target``, for the prefix :func:`wheel_installer` chose. uv has no --implementation/--abi:
    it takes them from ``--python`` (CPython, as pip's ``cp``/``cpXY``) and ``--python-version``."""
    pins = [f"onnxruntime=={versions['onnxruntime']}", f"numpy=={versions['numpy']}"]
    if _is_uv(installer):
        return [*installer, "install", "--quiet", "--no-cache", "--python", python, "--target", str(target),
                "--python-platform", UV_PLATFORM, "--python-version", pyver, "--only-binary", ":all:", *pins]
    abi = "cp" + pyver.replace(".", "")
    return [*installer, "install", "--quiet", "--disable-pip-version-check", "--no-cache-dir",
            "--target", str(target), "--platform", PIP_PLATFORM, "--python-version", pyver,
            "--implementation", "cp", "--abi", abi, "--only-binary=:all:", *pins]


def _probe_root(root: Path, qemu: str = guest.QEMU) -> dict:
    """Run the root's python under qemu: machine, python, numpy and onnxruntime versions (the setup's smoke test)."""
    try:
        p = guest.run_guest(root, ["-c", "import platform; print(platform.machine())"], "cortex-a72", timeout=120, qemu=qemu)
    except subprocess.TimeoutExpired:
        p = None
    if p is None or p.returncode != 0 or (p.stdout or "").strip() != "aarch64":
        why = "timed out" if p is None else f"exit {p.returncode}: {last_line(p.stderr or p.stdout)}"
        raise DeviceError(f"device aarch64-emu: {qemu} cannot run the arm64 python3 in {root} ({why}); check "
                          f"`{qemu} --version` and that the qemu-user-static package is intact "
                          "(`apt-get install --reinstall qemu-user-static`)")
    cpuinfo.write_cpuinfo(root, "neoverse-n1")
    p = guest.run_guest(root, ["-c", _PROBE_PY], "neoverse-n1", timeout=600, qemu=qemu)
    if p.returncode != 0:
        raise DeviceError(f"device aarch64-emu: `import onnxruntime` fails in the arm64 root {root} "
                          f"(exit {p.returncode}): {last_line(p.stderr)}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def setup(root: Path, *, log=print, ort_version: str | None = None) -> dict:
    """Build the arm64 root at ``root`` (or reuse a finished one with the same versions); a dict of facts."""
    t0 = time.perf_counter()
    root = Path(root).expanduser().absolute()
    versions = host_versions(ort_version)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # one setup of this root at a time; the next one reuses it
        stamp = guest.read_stamp(root)
        if stamp is not None and all(stamp.get(k) == v for k, v in versions.items()):
            log(f"arm64 root at {root} is ready (onnxruntime {stamp['onnxruntime']}, numpy {stamp['numpy']})")
            return _facts(root, stamp, time.perf_counter() - t0, reused=True)
        if stamp is not None:
            log(f"rebuilding {root}: it has onnxruntime {stamp.get('onnxruntime')} / numpy {stamp.get('numpy')}, "
                f"the host {versions['onnxruntime']} / {versions['numpy']}")
        elif os.path.lexists(root):
            log(f"rebuilding {root}: not a finished root (no valid {guest.STAMP})")
        for stale in [*root.parent.glob(f"{root.name}.tmp-*"), *root.parent.glob(f"{root.name}.old-*")]:
            log(f"removing the leftover {stale}")
            _remove_tree(stale)
        _ensure_tools(log)
        wheel_installer(sys.executable)     # no pip, uv or pip on PATH: say so now, not after debootstrap
        if os.geteuid() != 0:
            raise DeviceError("device aarch64-emu: building the arm64 root needs root (debootstrap); run "
                              f"`sudo {Path(sys.argv[0]).name} device setup aarch64-emu --root {root}`")
        log(f"binfmt_misc: {binfmt_status()}")
        tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
        log_file = root.parent / f"{root.name}.setup.log"
        log_file.write_text(f"pipeline device setup aarch64-emu {root} {time.ctime()}\n")
        log(f"building the arm64 {guest.SUITE} root in {tmp} (log: {log_file})")
        try:
            tmp.mkdir()
            _build_root(tmp, versions, log, log_file)
            qemu = guest.qemu_bin("aarch64-emu")
            probe = _probe_root(tmp, qemu)
            for k, v in versions.items():
                if probe.get(k) != v:
                    raise DeviceError(f"device aarch64-emu: the root got {k} {probe.get(k)}, expected {v}")
            stamp = {"format": guest.STAMP_FORMAT, **versions, "python": probe.get("python"),
                     "machine": probe.get("machine"), "providers": probe.get("providers"), "suite": guest.SUITE,
                     "qemu": guest.qemu_version(qemu), "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "build_s": round(time.perf_counter() - t0, 1)}
            atomic_write_text(tmp / guest.STAMP, json.dumps(stamp, indent=1), mode=0o644)
            old = root.with_name(f"{root.name}.old-{os.getpid()}")
            if os.path.lexists(root):
                os.rename(root, old)
            os.rename(tmp, root)
            _remove_tree(old)
        except BaseException:
            with contextlib.suppress(Exception):
                _remove_tree(tmp)
            raise
        # the hwcap cache and cpuinfo hold no path of the tmp folder: they stay valid after the rename
        log(f"arm64 root ready at {root}")
        return _facts(root, stamp, time.perf_counter() - t0, reused=False)


def _facts(root: Path, stamp: dict, seconds: float, *, reused: bool) -> dict:
    return {"root": str(root), "size_mb": _du_mb(root), "qemu": guest.qemu_version(), "python": stamp.get("python"),
            "onnxruntime": stamp.get("onnxruntime"), "numpy": stamp.get("numpy"), "suite": stamp.get("suite"),
            "binfmt": binfmt_status(), "reused": reused, "seconds": round(seconds, 1)}


