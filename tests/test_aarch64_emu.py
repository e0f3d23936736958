"""aarch64-emu device: fast unit tests (no arm64 root needed) and one integration test on the real root."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import DeviceConfig
from pipeline.devices import DeviceError, run_on_device, write_job
from pipeline.devices import aarch64_emu as emu
from pipeline.devices.aarch64_emu import cpuinfo, guest
from pipeline.devices.aarch64_emu import root as emu_root

FEATURES = {
    "cortex-a72": "fp asimd aes pmull sha1 sha2 crc32 cpuid",
    "cortex-a76": "fp asimd aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp",
    "neoverse-n1": "fp asimd aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp",
    "max": "fp asimd aes pmull sha1 sha2 crc32 atomics sve asimddp sve2 svei8mm svebf16 i8mm bf16 sme",
}


def fake_root(path: Path, stamp: dict | None = None) -> Path:
    """Just enough of a finished root for read_stamp (no arm64 binaries)."""
    (path / "usr/bin").mkdir(parents=True)
    (path / "usr/bin/python3").write_text("")
    (path / emu.SITE.lstrip("/") / "onnxruntime").mkdir(parents=True)
    (path / emu.STAMP).write_text(json.dumps(stamp or {"format": emu.STAMP_FORMAT, "onnxruntime": "1.0",
                                                        "numpy": "2.0", "python": "3.11.2"}))
    return path


def emu_dev(root: Path | str = "", cpu: str = "neoverse-n1") -> DeviceConfig:
    return DeviceConfig(target="aarch64-emu", qemu_cpu=cpu, root=str(root))


# ------------------------------------------------------------------------------------------------ cpuinfo text
@pytest.mark.parametrize("cpu", sorted(emu.CPUS))
def test_cpuinfo_text_per_cpu_model(cpu):
    text = cpuinfo.cpuinfo_text("  " + FEATURES[cpu] + " \n", emu.CPUS[cpu], 2)
    blocks = text.strip().split("\n\n")
    assert len(blocks) == 2 and text.endswith("\n\n")
    for i, block in enumerate(blocks):
        fields = dict((k.strip(), v.strip()) for k, v in (ln.split(":", 1) for ln in block.splitlines()))
        assert fields["processor"] == str(i)
        assert fields["Features"] == FEATURES[cpu]          # whitespace normalised, order kept
        assert fields["CPU implementer"] == "0x41"
        assert fields["CPU architecture"] == "8"
        assert fields["CPU part"] == emu.CPUS[cpu]
    assert "Features\t: " in text and "CPU part\t: " in text   # the kernel's tab layout (cpuinfo parses it)


def test_cpu_parts_are_the_arm_midr_numbers():
    assert emu.CPUS == {"cortex-a72": "0xd08", "cortex-a76": "0xd0b", "neoverse-n1": "0xd0c", "max": "0xd4f"}


def test_write_cpuinfo_caches_hwcaps_and_never_writes_through_a_proc_symlink(tmp_path, monkeypatch):
    root = fake_root(tmp_path / "root")
    host_proc = tmp_path / "hostproc"           # stands in for the host's /proc that debootstrap links to
    host_proc.mkdir()
    (root / "proc").symlink_to(host_proc)
    calls = []

    def fake_guest(root_, args, cpu, **kw):
        calls.append(cpu)
        return subprocess.CompletedProcess(args, 0, FEATURES[cpu] + "\n", "")

    monkeypatch.setattr(guest, "run_guest", fake_guest)
    monkeypatch.setattr(guest, "qemu_version", lambda qemu=None: "7.2.22")
    path = cpuinfo.write_cpuinfo(root, "cortex-a72", ncpu=3)
    assert path == root / "proc" / "cpuinfo"
    assert not (root / "proc").is_symlink() and (root / "proc").is_dir()
    assert list(host_proc.iterdir()) == []
    assert path.read_text() == cpuinfo.cpuinfo_text(FEATURES["cortex-a72"], "0xd08", 3)
    cpuinfo.write_cpuinfo(root, "cortex-a72", ncpu=3)
    cpuinfo.write_cpuinfo(root, "max", ncpu=3)
    assert calls == ["cortex-a72", "max"]        # read once per CPU model, then cached in the root
    assert "sme" in path.read_text()
    monkeypatch.setattr(guest, "qemu_version", lambda qemu=None: "8.0")
    cpuinfo.write_cpuinfo(root, "max", ncpu=3)
    assert calls == ["cortex-a72", "max", "max"]   # a different qemu re-reads them


def test_hwcaps_failure_is_one_line(tmp_path, monkeypatch):
    root = fake_root(tmp_path / "root")
    monkeypatch.setattr(guest, "qemu_version", lambda qemu=None: "7.2")
    monkeypatch.setattr(guest, "run_guest", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "qemu-aarch64-static: Could not open '/lib/ld-linux-aarch64.so.1': No such file or directory\n"))
    with pytest.raises(DeviceError) as e:
        cpuinfo.hwcaps(root, "neoverse-n1")
    msg = str(e.value)
    assert "\n" not in msg and "aarch64-emu:neoverse-n1" in msg and "ld-linux-aarch64" in msg


# ------------------------------------------------------------------------------------------- argv / environment
def test_qemu_argv_and_clean_guest_env(tmp_path, monkeypatch):
    root = tmp_path / "r"
    assert guest.qemu_argv(root, ["a.py", "x"]) == ["qemu-aarch64-static", "-L", str(root),
                                                  str(root / "usr/bin/python3"), "a.py", "x"]
    base = {"HOME": "/home/u", "PATH": "/x/venv/bin:/usr/bin", "PYTHONPATH": "/host/site", "VIRTUAL_ENV": "/x/venv",
            "LD_LIBRARY_PATH": "/x/lib", "OMP_NUM_THREADS": "1", "SECRET": "s"}
    env = guest.guest_env("cortex-a72", base=base)
    assert env == {"PATH": "/usr/bin:/bin", "HOME": "/home/u", "LANG": "C.UTF-8", "QEMU_CPU": "cortex-a72",
                   "PYTHONPATH": "/opt/ortsite", "PYTHONNOUSERSITE": "1", "PIPELINE_EMULATED": "1",
                   "OMP_NUM_THREADS": "1"}
    assert guest.guest_env("max", base={})["HOME"] == "/root"


def test_default_root_and_dev_root(tmp_path, monkeypatch):
    monkeypatch.delenv("PIPELINE_ARM_ROOT", raising=False)
    assert emu.default_root() == Path.home() / ".cache/pipeline/aarch64-root"
    monkeypatch.setenv("PIPELINE_ARM_ROOT", str(tmp_path / "env"))
    assert emu.default_root() == tmp_path / "env"
    assert emu.root_of(emu_dev()) == tmp_path / "env"
    assert emu.root_of(emu_dev(tmp_path / "mine")) == tmp_path / "mine"


def job(tmp_path: Path) -> Path:
    d = tmp_path / "job"
    d.mkdir()
    for n in ("device_bench.py", "job.json", "inputs.npy", "m.onnx"):
        (d / n).write_text("x")
    return d


def test_missing_root_error_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_ARM_ROOT", str(tmp_path / "default"))
    with pytest.raises(DeviceError) as e:
        run_on_device(emu_dev(cpu="cortex-a72"), job(tmp_path), timeout_s=5)
    assert str(e.value) == (f"device aarch64-emu:cortex-a72: no arm64 root at {tmp_path / 'default'}; "
                            "run `pipeline device setup aarch64-emu`")
    half = tmp_path / "half"                      # a root without its stamp is not a root
    (half / "usr/bin").mkdir(parents=True)
    with pytest.raises(DeviceError, match=r"no arm64 root at .*half; run `pipeline device setup aarch64-emu "
                                          r"--root .*half`$"):
        emu.run(tmp_path / "job", emu_dev(half), 5)


def test_unknown_qemu_cpu(tmp_path):
    with pytest.raises(DeviceError) as e:
        emu.run(tmp_path, emu_dev(tmp_path, cpu="cortex-a53"), 5)
    msg = str(e.value)
    assert "\n" not in msg and "unknown qemu_cpu 'cortex-a53'" in msg
    for cpu in ("cortex-a72", "cortex-a76", "neoverse-n1", "max"):
        assert cpu in msg


class FakeRun:
    """Stands in for subprocess.run of the guest python; records argv/env/cwd."""

    def __init__(self, rc=0, stderr="", write_result=True, timeout=False):
        self.rc, self.stderr, self.write_result, self.timeout, self.calls = rc, stderr, write_result, timeout, []

    def __call__(self, argv, env=None, cwd=None, capture_output=None, text=None, timeout=None):
        self.calls.append({"argv": argv, "env": env, "cwd": cwd, "timeout": timeout})
        if self.timeout:
            raise subprocess.TimeoutExpired(argv, timeout)
        if self.write_result:
            Path(argv[-1]).write_text(json.dumps({"runtime": {"emulated": True}}))
        return subprocess.CompletedProcess(argv, self.rc, "", self.stderr)


@pytest.fixture
def fake_built(tmp_path, monkeypatch):
    root = fake_root(tmp_path / "root")
    monkeypatch.setattr(cpuinfo, "hwcaps", lambda r, cpu, **k: FEATURES[cpu])
    monkeypatch.setattr(guest.shutil, "which", lambda exe: f"/usr/bin/{exe}")
    return root


def test_run_builds_the_qemu_command(tmp_path, monkeypatch, fake_built):
    fake = FakeRun()
    monkeypatch.setattr(guest.subprocess, "run", fake)
    d = job(tmp_path)
    out = run_on_device(emu_dev(fake_built, "max"), d, timeout_s=77)
    assert out == {"runtime": {"emulated": True}}
    (call,) = fake.calls
    assert call["argv"] == ["/usr/bin/qemu-aarch64-static", "-L", str(fake_built), str(fake_built / "usr/bin/python3"),
                            str(d / "device_bench.py"), str(d / "job.json"), str(d / "result.json")]
    assert call["env"]["QEMU_CPU"] == "max" and call["env"]["PIPELINE_EMULATED"] == "1"
    assert call["env"]["PYTHONPATH"] == "/opt/ortsite" and call["cwd"] == str(d) and call["timeout"] == 77
    assert (fake_built / "proc/cpuinfo").read_text() == cpuinfo.cpuinfo_text(FEATURES["max"], "0xd4f", os.cpu_count())


def test_run_failure_and_timeout_are_one_line(tmp_path, monkeypatch, fake_built):
    d = job(tmp_path)
    monkeypatch.setattr(guest.subprocess, "run", FakeRun(rc=-11, write_result=False, stderr=(
        "Traceback...\nqemu: uncaught target signal 11 (Segmentation fault) - core dumped\n")))
    with pytest.raises(DeviceError) as e:
        emu.run(d, emu_dev(fake_built), 60)
    assert str(e.value) == ("device aarch64-emu:neoverse-n1: benchmark failed under qemu (exit -11): "
                            "qemu: uncaught target signal 11 (Segmentation fault) - core dumped")
    monkeypatch.setattr(guest.subprocess, "run", FakeRun(timeout=True))
    with pytest.raises(DeviceError, match=r"^device pi: benchmark did not finish within 60 s under emulation"):
        emu.run(d, DeviceConfig(target="aarch64-emu", name="pi", root=str(fake_built)), 60)
    monkeypatch.setattr(guest.subprocess, "run", FakeRun(write_result=False))
    with pytest.raises(DeviceError, match="exited 0 but wrote no"):
        emu.run(d, emu_dev(fake_built), 60)


def test_run_refuses_a_job_shadowed_in_the_root(tmp_path, monkeypatch, fake_built):
    d = job(tmp_path)
    shadow = Path(str(fake_built) + str(d / "job.json"))
    shadow.parent.mkdir(parents=True)
    shadow.write_text("{}")
    monkeypatch.setattr(guest.subprocess, "run", FakeRun())
    with pytest.raises(DeviceError, match="would hide the job's"):
        emu.run(d, emu_dev(fake_built), 60)


# -------------------------------------------------------------------------------------------------------- setup
def test_missing_apt_packages_not_root(monkeypatch):
    monkeypatch.setattr(guest.shutil, "which", lambda exe: None if exe == "qemu-aarch64-static" else "/usr/sbin/x")
    monkeypatch.setattr(guest.os, "geteuid", lambda: 1000)
    with pytest.raises(DeviceError) as e:
        emu_root._ensure_tools(print)
    assert str(e.value) == ("device aarch64-emu: setup needs the apt package(s) qemu-user-static; run "
                            "`sudo sh -c 'apt-get update && apt-get install -y qemu-user-static'` and then "
                            "`pipeline device setup aarch64-emu` again")


def test_binfmt_status_says_not_needed(tmp_path, monkeypatch):
    monkeypatch.setattr(emu_root, "BINFMT_DIR", tmp_path / "none")
    assert emu.binfmt_status() == "binfmt_misc not mounted; not needed (explicit qemu route)"
    (tmp_path / "b").mkdir()
    (tmp_path / "b/register").write_text("")
    monkeypatch.setattr(emu_root, "BINFMT_DIR", tmp_path / "b")
    assert emu.binfmt_status().startswith("binfmt_misc mounted, qemu-aarch64 not registered; not needed")
    (tmp_path / "b/qemu-aarch64").write_text("enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n")
    assert emu.binfmt_status() == "qemu-aarch64 registered (enabled); not needed (explicit qemu route)"


@pytest.fixture
def fake_builder(monkeypatch):
    """setup() with the slow parts replaced: a builder that writes a plausible root, a probe, no apt."""
    built = []

    def build(tmp, versions, log, log_file):
        assert tmp.name.startswith("root.tmp-") and tmp.is_dir() and not (tmp / emu.STAMP).exists()
        built.append(dict(versions))
        if versions["onnxruntime"] == "boom":
            (tmp / "usr").mkdir()
            raise KeyboardInterrupt          # an interrupted setup
        (tmp / "usr/bin").mkdir(parents=True)
        (tmp / "usr/bin/python3").write_text("")
        (tmp / emu.SITE.lstrip("/") / "onnxruntime").mkdir(parents=True)
        (tmp / "marker").write_text(str(len(built)))

    monkeypatch.setattr(emu_root, "_build_root", build)
    monkeypatch.setattr(emu_root, "_ensure_tools", lambda log: None)
    monkeypatch.setattr(emu_root, "wheel_installer", lambda python, **k: [python, "-m", "pip"])  # a pip-less venv too
    monkeypatch.setattr(guest, "qemu_bin", lambda label: "qemu-aarch64-static")
    monkeypatch.setattr(guest, "qemu_version", lambda qemu=None: "7.2.22")
    monkeypatch.setattr(guest.os, "geteuid", lambda: 0)
    monkeypatch.setattr(emu_root, "host_versions", lambda v=None: {"onnxruntime": v or "1.32.0", "numpy": "2.4.6"})
    monkeypatch.setattr(emu_root, "_probe_root", lambda root, qemu=emu.QEMU: {
        "machine": "aarch64", "python": "3.11.2", "numpy": "2.4.6", "providers": ["CPUExecutionProvider"],
        "onnxruntime": json.loads((root / "want.json").read_text()) if (root / "want.json").exists() else None})
    return built


def test_setup_is_idempotent_and_atomic(tmp_path, fake_builder, monkeypatch):
    # the probe reports the version the builder was asked for
    real_build = emu_root._build_root

    def build(tmp, versions, log, log_file):
        real_build(tmp, versions, log, log_file)
        (tmp / "want.json").write_text(json.dumps(versions["onnxruntime"]))

    monkeypatch.setattr(emu_root, "_build_root", build)
    root = tmp_path / "root"
    logs = []
    facts = emu.setup(root, log=logs.append)
    assert facts["reused"] is False and facts["onnxruntime"] == "1.32.0" and facts["numpy"] == "2.4.6"
    assert facts["python"] == "3.11.2" and facts["root"] == str(root) and "not needed" in facts["binfmt"]
    stamp = emu.read_stamp(root)
    assert stamp["onnxruntime"] == "1.32.0" and stamp["qemu"] == "7.2.22"
    assert len(fake_builder) == 1
    # finished root with the same versions: reused, not rebuilt
    facts = emu.setup(root, log=logs.append)
    assert facts["reused"] is True and len(fake_builder) == 1
    # another onnxruntime version: rebuilt, and the new root replaces the old one
    facts = emu.setup(root, log=logs.append, ort_version="1.31.0")
    assert facts["reused"] is False and len(fake_builder) == 2 and emu.read_stamp(root)["onnxruntime"] == "1.31.0"
    assert (root / "marker").read_text() == "2"
    # a half-built root (stamp gone) is rebuilt
    (root / emu.STAMP).unlink()
    emu.setup(root, log=logs.append, ort_version="1.31.0")
    assert len(fake_builder) == 3 and emu.read_stamp(root) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".root.lock", "root", "root.setup.log"]


def test_interrupted_setup_leaves_no_finished_looking_root(tmp_path, fake_builder):
    root = tmp_path / "root"
    with pytest.raises(KeyboardInterrupt):
        emu.setup(root, log=lambda m: None, ort_version="boom")
    assert not root.exists() and emu.read_stamp(root) is None
    assert not list(tmp_path.glob("root.tmp-*"))
    # a leftover from a killed setup (no cleanup ran) is removed by the next one
    (tmp_path / "root.tmp-999999/usr").mkdir(parents=True)
    with pytest.raises(DeviceError, match="expected 1.32.0"):
        emu.setup(root, log=lambda m: None)      # probe says None: version mismatch is an error, not a root
    assert not root.exists() and not list(tmp_path.glob("root.tmp-*"))


def test_version_mismatch_is_not_stamped(tmp_path, fake_builder):
    with pytest.raises(DeviceError, match=r"^device aarch64-emu: the root got onnxruntime None, expected 1.32.0$"):
        emu.setup(tmp_path / "root", log=lambda m: None)
    assert emu.read_stamp(tmp_path / "root") is None


def test_setup_smoke_says_what_to_do_when_qemu_cannot_run_the_root(tmp_path, monkeypatch):
    monkeypatch.setattr(guest, "run_guest", lambda *a, **k: subprocess.CompletedProcess(
        a, 255, "", "qemu-aarch64-static: /r/usr/bin/python3: Invalid ELF image for this architecture\n"))
    with pytest.raises(DeviceError) as e:
        emu_root._probe_root(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "cannot run the arm64 python3" in msg and "Invalid ELF image" in msg
    assert "apt-get install --reinstall qemu-user-static" in msg


def test_remove_tree_refuses_mount_points(tmp_path, monkeypatch):
    d = tmp_path / "r"
    (d / "dev").mkdir(parents=True)
    monkeypatch.setattr(guest, "mounts_under", lambda p: [str(d / "dev")])
    with pytest.raises(DeviceError, match="refusing to delete"):
        emu_root._remove_tree(d)
    assert d.is_dir()


def test_cli_device_parser():
    from pipeline.cli import _parser

    a = _parser().parse_args(["device", "check", "aarch64-emu", "--qemu-cpu", "cortex-a72", "--root", "/x"])
    assert (a.command, a.device_command, a.kind, a.qemu_cpu, a.root, a.debug) == (
        "device", "check", "aarch64-emu", "cortex-a72", "/x", False)
    a = _parser().parse_args(["device", "setup", "aarch64-emu", "--debug"])
    assert (a.device_command, a.root, a.debug) == ("setup", None, True)


def test_cli_check_unknown_cpu_exits_2(capsys):
    from pipeline.cli import main

    assert main(["device", "check", "aarch64-emu", "--qemu-cpu", "a53"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pipeline: error: device aarch64-emu:a53: unknown qemu_cpu 'a53'") and "\n" not in err


# --------------------------------------------------------------------------------------------------- integration
@pytest.mark.arm_emu
def test_tiny_model_emulated_matches_host(tmp_path):
    root = emu.default_root()
    if emu.read_stamp(root) is None:
        pytest.skip(f"no arm64 root at {root}; run `pipeline device setup aarch64-emu`")
    model = emu.tiny_model(tmp_path / "tiny.onnx")
    x = np.random.default_rng(1).random((8, 3, 32, 32), dtype=np.float32)
    kw = dict(settings=[{"batch": 1, "threads": 1}], levels=["all"], warmup=1, runs=2, seed=0, predict_batch=4)
    write_job(tmp_path / "host", {"tiny": model}, x, **kw)
    write_job(tmp_path / "emu", {"tiny": model}, x, **kw)
    host = run_on_device(DeviceConfig(target="host"), tmp_path / "host", timeout_s=300)
    arm = run_on_device(emu_dev(cpu="neoverse-n1"), tmp_path / "emu", timeout_s=600)
    rt = arm["runtime"]
    assert rt["machine"] == "aarch64" and rt["emulated"] is True and rt["qemu_cpu"] == "neoverse-n1"
    assert rt["cpu"] == "implementer 0x41 part 0xd0c" and rt["onnxruntime"] == host["runtime"]["onnxruntime"]
    a, b = (np.asarray(r["models"]["tiny"]["logits"]) for r in (host, arm))
    assert a.shape == b.shape == (8, 10)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    assert (a.argmax(1) == b.argmax(1)).all()
    assert {r["graph_optimization"] for r in arm["latency"]} == {"all"}


def test_the_configs_qemu_cpu_list_is_the_emulators():
    """config validation (torch-free, pipeline/catalog) checks qemu_cpu against the list the guest describes."""
    from pipeline.catalog.devices import QEMU_CPUS
    from pipeline.devices.aarch64_emu import guest

    assert tuple(guest.CPUS) == QEMU_CPUS
