"""``aarch64-emu``: the real aarch64 onnxruntime build in an arm64 Debian root, run under qemu-user.

The root is built once by ``pipeline device setup aarch64-emu`` (:func:`setup`): debootstrap stage 1 only (host
native, no emulated stage 2), every downloaded .deb unpacked with ``dpkg-deb -x``, and the PyPI aarch64 wheels of
onnxruntime (the host's version) and numpy installed from the host with ``pip install --target ROOT/opt/ortsite``.

A job then runs as ``qemu-aarch64-static -L ROOT ROOT/usr/bin/python3 device_bench.py job.json result.json``
(:func:`run`): no chroot, no mounts, no binfmt_misc and no root rights at run time. With ``-L`` qemu looks up every
absolute path under ROOT first and falls back to the host path when it is not there, so the job folder (on the
host) and the host's /sys are visible to the guest. qemu 7.2 (Debian bookworm) shows the guest the host's x86
/proc/cpuinfo, on which ``import onnxruntime`` segfaults; :func:`write_cpuinfo` therefore puts an ARM-format
cpuinfo at ROOT/proc/cpuinfo whose ``Features`` are the emulated CPU's HWCAPs (read in the guest with getauxval).

Timings measured here are emulated instruction costs, not ARM latency; what this device checks honestly is that
the artifacts load and run under the aarch64 build and that their logits match the host's.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import DeviceError, device_name, last_line

QEMU = "qemu-aarch64-static"
SUITE = "bookworm"
SITE = "/opt/ortsite"                      # guest path of the pip --target folder
STAMP = ".pipeline-aarch64-root.json"      # written last: its presence marks a finished root
STAMP_FORMAT = 1
STATE = "var/lib/pipeline"                 # per-root cache (HWCAPs per CPU model) and the cpuinfo lock
# QEMU CPU model -> MIDR part number for the fake /proc/cpuinfo (implementer 0x41 = Arm)
CPUS = {"cortex-a72": "0xd08", "cortex-a76": "0xd0b", "neoverse-n1": "0xd0c", "max": "0xd4f"}
APT_PACKAGES = {QEMU: "qemu-user-static", "debootstrap": "debootstrap"}
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")

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

_PROBE_PY = r"""
import json, platform, sys
import numpy, onnxruntime
print(json.dumps({"machine": platform.machine(), "python": platform.python_version(), "numpy": numpy.__version__,
                  "onnxruntime": onnxruntime.__version__, "providers": onnxruntime.get_available_providers()}))
"""


# ---------------------------------------------------------------------------------------------------- paths, names
def default_root() -> Path:
    env = os.environ.get("PIPELINE_ARM_ROOT", "").strip()
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "pipeline" / "aarch64-root").absolute()


def root_of(dev) -> Path:
    """The device's arm64 root: ``dev.root`` if set, else :func:`default_root`."""
    # absolute: the guest runs with the job folder as its working directory
    return Path(dev.root).expanduser().absolute() if getattr(dev, "root", "") else default_root()


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
    return DeviceError(f"device {device_name(dev)}: no arm64 root at {root}; run "
                       f"`pipeline device setup aarch64-emu{'' if root == default_root() else f' --root {root}'}`")


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


def _qemu_bin(dev_label: str) -> str:
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


def _guest(root: Path, args: list[str], qemu_cpu: str, *, timeout: float, cwd: Path | None = None,
           qemu: str = QEMU) -> subprocess.CompletedProcess:
    return subprocess.run(qemu_argv(root, args, qemu), env=guest_env(qemu_cpu), cwd=str(cwd) if cwd else None,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------- fake cpuinfo
def cpuinfo_text(features: str, part: str, ncpu: int) -> str:
    """/proc/cpuinfo as an arm64 Linux kernel writes it (one block per core)."""
    block = ("processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: {f}\nCPU implementer\t: 0x41\n"
             "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: {p}\nCPU revision\t: 0\n\n")
    return "".join(block.format(i=i, f=" ".join(features.split()), p=part) for i in range(max(1, ncpu)))


def hwcaps(root: Path, qemu_cpu: str, *, qemu: str = QEMU) -> str:
    """The HWCAP feature names qemu gives ``qemu_cpu``, read in the guest once and cached in the root."""
    check_cpu(qemu_cpu)
    version = qemu_version(qemu)
    cache = Path(root) / STATE / f"hwcap-{qemu_cpu}.json"
    try:
        data = json.loads(cache.read_text())
        if data.get("qemu") == version and data.get("features"):
            return data["features"]
    except (OSError, ValueError, AttributeError):
        pass
    try:
        p = _guest(root, ["-c", _HWCAP_PY], qemu_cpu, timeout=120, qemu=qemu)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"device aarch64-emu:{qemu_cpu}: reading the emulated CPU's HWCAPs timed out") from None
    features = (p.stdout or "").strip().splitlines()
    if p.returncode != 0 or not features or "fp" not in features[-1].split():
        raise DeviceError(f"device aarch64-emu:{qemu_cpu}: {QEMU} could not run the arm64 python in {root} "
                          f"(exit {p.returncode}): {last_line(p.stderr)}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(cache, json.dumps({"qemu": version, "qemu_cpu": qemu_cpu, "features": features[-1]}))
    return features[-1]


def _real_proc_dir(root: Path) -> Path:
    """ROOT/proc as a real directory inside the root (debootstrap may leave a symlink to the host's /proc)."""
    root = Path(root)
    proc = root / "proc"
    if proc.is_symlink():
        proc.unlink()                       # the link only: never write through it into the host's /proc
    if _is_mountpoint(proc):
        raise DeviceError(f"device aarch64-emu: {proc} is a mount point (a procfs?); unmount it first")
    proc.mkdir(parents=True, exist_ok=True)
    real_root, real_proc = os.path.realpath(root), os.path.realpath(proc)
    if os.path.dirname(real_proc) != real_root:
        raise DeviceError(f"device aarch64-emu: {proc} resolves outside the root ({real_proc}); not writing there")
    return proc


def write_cpuinfo(root: Path, qemu_cpu: str, *, ncpu: int | None = None) -> Path:
    """Write ROOT/proc/cpuinfo for ``qemu_cpu`` (HWCAPs read in the guest, cached per CPU model); its path."""
    check_cpu(qemu_cpu)
    text = cpuinfo_text(hwcaps(root, qemu_cpu), CPUS[qemu_cpu], ncpu or os.cpu_count() or 1)
    path = _real_proc_dir(root) / "cpuinfo"
    if not (path.is_file() and path.read_text() == text):
        _atomic_write(path, text)
    return path


@contextlib.contextmanager
def _cpuinfo_for(root: Path, qemu_cpu: str):
    """Hold ROOT/proc/cpuinfo at ``qemu_cpu``'s text for the block: runs of one CPU model share it (shared lock);
    a run of another model waits until they are done, then rewrites it (exclusive lock)."""
    text = cpuinfo_text(hwcaps(root, qemu_cpu), CPUS[qemu_cpu], os.cpu_count() or 1)
    path = _real_proc_dir(root) / "cpuinfo"
    lock_path = Path(root) / STATE / "cpuinfo.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as lock:
        while True:
            fcntl.flock(lock, fcntl.LOCK_SH)
            if path.is_file() and path.read_text() == text:
                break
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(lock, fcntl.LOCK_EX)
            _atomic_write(path, text)
            fcntl.flock(lock, fcntl.LOCK_UN)  # loop: take the shared lock and check again
        try:
            yield path
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------- transport
def run(job_dir: Path, dev, timeout_s: float) -> Path:
    """Run ``device_bench.py`` of ``job_dir`` under qemu with the root's python; the path of result.json."""
    name = device_name(dev)
    check_cpu(dev.qemu_cpu)
    root = root_of(dev)
    if read_stamp(root) is None:
        raise missing_root_error(dev, root)
    qemu = _qemu_bin(name)
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
    with _cpuinfo_for(root, dev.qemu_cpu):
        try:
            p = _guest(root, args, dev.qemu_cpu, timeout=timeout_s, cwd=job_dir, qemu=qemu)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"device {name}: benchmark did not finish within {timeout_s:.0f} s under emulation "
                              "(~500x slower than native: lower runs/batches for this device or raise its "
                              "timeout_s)") from None
    if p.returncode != 0:
        raise DeviceError(f"device {name}: benchmark failed under qemu (exit {p.returncode}): {last_line(p.stderr)}")
    if not result.is_file():
        raise DeviceError(f"device {name}: the benchmark exited 0 but wrote no {result}")
    return result


# -------------------------------------------------------------------------------------------------------- setup
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


def _mounts_under(path: Path) -> list[str]:
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


def _is_mountpoint(path: Path) -> bool:
    return os.path.lexists(path) and not os.path.islink(path) and os.path.ismount(path)


def _remove_tree(path: Path) -> None:
    """rm -rf that refuses to descend into anything mounted below ``path`` (debootstrap may bind-mount /dev)."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
        return
    mounts = _mounts_under(path)
    if mounts:
        raise DeviceError(f"device aarch64-emu: refusing to delete {path}: {mounts[0]} is mounted there; "
                          f"unmount it (umount -R {mounts[0]}) first")
    shutil.rmtree(path)        # never follows symlinks (ROOT/proc -> /proc is unlinked, not emptied)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
    _step(["debootstrap", "--arch=arm64", "--foreign", "--variant=minbase", "--include=python3", SUITE, str(tmp),
           mirror], f"debootstrap (arm64 {SUITE} from {mirror})", log_file)
    mounts = _mounts_under(tmp)
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
    _real_proc_dir(tmp)         # stage 1 leaves ROOT/proc -> /proc (the host's, seen from outside a chroot)
    pythons = sorted(p.name for p in (tmp / "usr/bin").glob("python3.*") if p.name[8:].isdigit())
    if not pythons:
        raise DeviceError(f"device aarch64-emu: no python3.X in {tmp / 'usr/bin'} after unpacking (log: {log_file})")
    pyver = pythons[-1][len("python"):]
    log(f"  dpkg-deb -x: {time.perf_counter() - t:.1f}s (python {pyver})")
    t = time.perf_counter()
    abi = "cp" + pyver.replace(".", "")
    _step([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-cache-dir",
           "--target", str(tmp / SITE.lstrip("/")), "--platform", "manylinux_2_28_aarch64", "--python-version", pyver,
           "--implementation", "cp", "--abi", abi, "--only-binary=:all:",
           f"onnxruntime=={versions['onnxruntime']}", f"numpy=={versions['numpy']}"],
          f"pip install of the aarch64 wheels onnxruntime=={versions['onnxruntime']} numpy=={versions['numpy']}",
          log_file)
    log(f"  pip --target (aarch64 wheels): {time.perf_counter() - t:.1f}s")


def _probe_root(root: Path, qemu: str = QEMU) -> dict:
    """Run the root's python under qemu: machine, python, numpy and onnxruntime versions (the setup's smoke test)."""
    try:
        p = _guest(root, ["-c", "import platform; print(platform.machine())"], "cortex-a72", timeout=120, qemu=qemu)
    except subprocess.TimeoutExpired:
        p = None
    if p is None or p.returncode != 0 or (p.stdout or "").strip() != "aarch64":
        why = "timed out" if p is None else f"exit {p.returncode}: {last_line(p.stderr or p.stdout)}"
        raise DeviceError(f"device aarch64-emu: {qemu} cannot run the arm64 python3 in {root} ({why}); check "
                          f"`{qemu} --version` and that the qemu-user-static package is intact "
                          "(`apt-get install --reinstall qemu-user-static`)")
    write_cpuinfo(root, "neoverse-n1")
    p = _guest(root, ["-c", _PROBE_PY], "neoverse-n1", timeout=600, qemu=qemu)
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
        stamp = read_stamp(root)
        if stamp is not None and all(stamp.get(k) == v for k, v in versions.items()):
            log(f"arm64 root at {root} is ready (onnxruntime {stamp['onnxruntime']}, numpy {stamp['numpy']})")
            return _facts(root, stamp, time.perf_counter() - t0, reused=True)
        if stamp is not None:
            log(f"rebuilding {root}: it has onnxruntime {stamp.get('onnxruntime')} / numpy {stamp.get('numpy')}, "
                f"the host {versions['onnxruntime']} / {versions['numpy']}")
        elif os.path.lexists(root):
            log(f"rebuilding {root}: not a finished root (no valid {STAMP})")
        for stale in [*root.parent.glob(f"{root.name}.tmp-*"), *root.parent.glob(f"{root.name}.old-*")]:
            log(f"removing the leftover {stale}")
            _remove_tree(stale)
        _ensure_tools(log)
        if os.geteuid() != 0:
            raise DeviceError("device aarch64-emu: building the arm64 root needs root (debootstrap); run "
                              f"`sudo {Path(sys.argv[0]).name} device setup aarch64-emu --root {root}`")
        log(f"binfmt_misc: {binfmt_status()}")
        tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
        log_file = root.parent / f"{root.name}.setup.log"
        log_file.write_text(f"pipeline device setup aarch64-emu {root} {time.ctime()}\n")
        log(f"building the arm64 {SUITE} root in {tmp} (log: {log_file})")
        try:
            tmp.mkdir()
            _build_root(tmp, versions, log, log_file)
            qemu = _qemu_bin("aarch64-emu")
            probe = _probe_root(tmp, qemu)
            for k, v in versions.items():
                if probe.get(k) != v:
                    raise DeviceError(f"device aarch64-emu: the root got {k} {probe.get(k)}, expected {v}")
            stamp = {"format": STAMP_FORMAT, **versions, "python": probe.get("python"),
                     "machine": probe.get("machine"), "providers": probe.get("providers"), "suite": SUITE,
                     "qemu": qemu_version(qemu), "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "build_s": round(time.perf_counter() - t0, 1)}
            _atomic_write(tmp / STAMP, json.dumps(stamp, indent=1))
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
    return {"root": str(root), "size_mb": _du_mb(root), "qemu": qemu_version(), "python": stamp.get("python"),
            "onnxruntime": stamp.get("onnxruntime"), "numpy": stamp.get("numpy"), "suite": stamp.get("suite"),
            "binfmt": binfmt_status(), "reused": reused, "seconds": round(seconds, 1)}


# -------------------------------------------------------------------------------------------------------- check
def tiny_model(path: Path, seed: int = 0) -> Path:
    """A small CIFAR-shaped ONNX model (Conv-BN-ReLU x2, residual Add, GAP, Gemm): 3x32x32 -> 10 logits."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def init(name, arr):
        return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)

    c = 8
    inits = [init("w1", rng.normal(0, (2 / 27) ** 0.5, (c, 3, 3, 3))), init("b1", rng.normal(0, 0.1, c)),
             init("w2", rng.normal(0, (2 / (9 * c)) ** 0.5, (c, c, 3, 3))),
             init("g", rng.uniform(0.5, 1.5, c)), init("be", rng.normal(0, 0.1, c)),
             init("mu", rng.normal(0, 0.1, c)), init("var", rng.uniform(0.5, 1.5, c)),
             init("fw", rng.normal(0, (1 / c) ** 0.5, (10, c))), init("fb", rng.normal(0, 0.01, 10))]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c2", "g", "be", "mu", "var"], ["n2"]),
             helper.make_node("Add", ["n2", "r1"], ["a"]), helper.make_node("Relu", ["a"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["gp"]),
             helper.make_node("Flatten", ["gp"], ["fl"], axis=1),
             helper.make_node("Gemm", ["fl", "fw", "fb"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "tiny_cifar",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="pipeline-check")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)


def compare_logits(host, emu) -> dict:
    import numpy as np
    a, b = np.asarray(host, dtype=np.float64), np.asarray(emu, dtype=np.float64)
    if a.shape != b.shape:
        return {"shape_host": list(a.shape), "shape_emu": list(b.shape), "ok": False}
    d = np.abs(a - b)
    scale = float(np.abs(a).max()) or 1.0
    return {"images": int(a.shape[0]), "max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "rel": float(d.max() / scale), "top1_agree": int((a.argmax(1) == b.argmax(1)).sum())}


def check(root: Path | None = None, qemu_cpu: str = "neoverse-n1", *, log=print, images: int = 16,
          rel_tol: float = 1e-4) -> dict:
    """Run a tiny model on the host and on ``aarch64-emu:<qemu_cpu>``; the agreement of their logits."""
    import numpy as np

    from ..config import DeviceConfig
    from . import run_on_device, write_job

    check_cpu(qemu_cpu)
    emu = DeviceConfig(target="aarch64-emu", qemu_cpu=qemu_cpu, root=str(root) if root else "")
    with tempfile.TemporaryDirectory(prefix="pipeline-devcheck-") as tmpdir:
        tmp = Path(tmpdir)
        model = tiny_model(tmp / "tiny.onnx")
        x = np.random.default_rng(0).random((images, 3, 32, 32), dtype=np.float32)
        kw = dict(settings=[{"batch": 1, "threads": 1}], levels=["all"], warmup=1, runs=3, seed=0, predict_batch=8)
        write_job(tmp / "host", {"tiny": model}, x, **kw)
        write_job(tmp / "emu", {"tiny": model}, x, **kw)
        host = run_on_device(DeviceConfig(target="host"), tmp / "host", timeout_s=300)
        t = time.perf_counter()
        arm = run_on_device(emu, tmp / "emu", timeout_s=900)
        emu_s = time.perf_counter() - t
    agree = compare_logits(host["models"]["tiny"]["logits"], arm["models"]["tiny"]["logits"])
    if "shape_host" in agree:
        raise DeviceError(f"device {device_name(emu)}: logits of shape {agree['shape_emu']}, the host's "
                          f"{agree['shape_host']}")
    agree["ok"] = bool(agree.get("rel", 1.0) <= rel_tol and agree.get("top1_agree") == agree.get("images"))
    return {"device": device_name(emu), "root": str(root_of(emu)), "host_runtime": host["runtime"],
            "emu_runtime": arm["runtime"], "emu_seconds": round(emu_s, 1), "rel_tol": rel_tol, **agree}
