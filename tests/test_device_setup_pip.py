"""``pipeline device setup aarch64-emu`` fetches the aarch64 wheels with what the host has: this interpreter's pip,
else ``uv pip``, else a pip on PATH; with none of them a one-line error says how to get pip (a uv-made venv has no
pip). No network: the chooser and the argv builder are pure, and the build steps are faked."""
import sys
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.devices import DeviceError
from pipeline.devices.aarch64_emu import cpuinfo, guest
from pipeline.devices.aarch64_emu import root as emu_root

PY = "/home/u/proj/.venv/bin/python"
VERSIONS = {"onnxruntime": "1.32.0", "numpy": "2.4.6"}


def on_path(*names):
    """A fake shutil.which that finds only ``names`` (in /opt/bin), recording every lookup."""
    asked = []

    def which(name):
        asked.append(name)
        return f"/opt/bin/{name}" if name in names else None
    which.asked = asked
    return which


def test_pip_importable_is_this_interpreter_pip():
    which = on_path("uv", "pip3", "pip")
    assert emu_root.wheel_installer(PY, which=which, has_pip=lambda: True) == [PY, "-m", "pip"]
    assert which.asked == []                 # PATH is not even looked at


def test_no_pip_uses_uv_on_path():
    which = on_path("uv", "pip3", "pip")
    assert emu_root.wheel_installer(PY, which=which, has_pip=lambda: False) == ["/opt/bin/uv", "pip"]


@pytest.mark.parametrize("names, expected", [(("pip3", "pip"), "/opt/bin/pip3"), (("pip",), "/opt/bin/pip")])
def test_no_pip_no_uv_uses_a_pip_on_path(names, expected):
    which = on_path(*names)
    assert emu_root.wheel_installer(PY, which=which, has_pip=lambda: False) == [expected]
    assert which.asked[0] == "uv"


def test_nothing_is_a_one_line_error_saying_how_to_get_pip():
    with pytest.raises(DeviceError) as e:
        emu_root.wheel_installer(PY, which=on_path(), has_pip=lambda: False)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("device aarch64-emu: no pip found to fetch the aarch64 wheels: ")
    assert f"`{PY} -m ensurepip`" in msg and f"`uv pip install --python {PY} pip`" in msg
    assert "no uv, pip3 or pip on PATH" in msg


def test_defaults_look_at_this_interpreter_and_path(monkeypatch):
    monkeypatch.setattr(emu_root, "_pip_importable", lambda: False)
    monkeypatch.setattr(emu_root.shutil, "which", on_path("uv"))
    assert emu_root.wheel_installer(PY) == ["/opt/bin/uv", "pip"]


def test_uv_command_has_target_platform_python_version_and_pins(tmp_path):
    target = tmp_path / "root.tmp-1" / "opt/ortsite"
    argv = emu_root.wheel_install_argv(["/opt/bin/uv", "pip"], target, "3.11", VERSIONS, python=PY)
    assert argv[:3] == ["/opt/bin/uv", "pip", "install"]
    pairs = {argv[i]: argv[i + 1] for i in range(len(argv) - 1)}
    assert pairs["--target"] == str(target)
    assert pairs["--python-platform"] == "aarch64-manylinux_2_28"
    assert pairs["--python-version"] == "3.11"
    assert pairs["--python"] == PY
    assert pairs["--only-binary"] == ":all:"
    assert argv[-2:] == ["onnxruntime==1.32.0", "numpy==2.4.6"]
    # pip-only flags that uv pip install does not know
    assert not {"--platform", "--abi", "--implementation", "--disable-pip-version-check", "--no-cache-dir"} & set(argv)


def test_pip_command_is_unchanged(tmp_path):
    target = tmp_path / "opt/ortsite"
    argv = emu_root.wheel_install_argv([sys.executable, "-m", "pip"], target, "3.11", VERSIONS, python=sys.executable)
    assert argv == [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "--no-cache-dir", "--target", str(target), "--platform", "manylinux_2_28_aarch64",
                    "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--only-binary=:all:",
                    "onnxruntime==1.32.0", "numpy==2.4.6"]
    # a pip found on PATH takes the same flags
    assert emu_root.wheel_install_argv(["/opt/bin/pip3"], target, "3.11", VERSIONS, python=PY)[1:] == argv[3:]


def test_build_root_installs_the_wheels_with_uv_when_there_is_no_pip(tmp_path, monkeypatch):
    """_build_root with debootstrap/dpkg-deb faked: the wheel step is the uv command."""
    steps = []

    def step(argv, what, log_file, **kw):
        steps.append((argv, what))
        if argv[0] == "debootstrap":
            (tmp / "var/cache/apt/archives").mkdir(parents=True)
            (tmp / "var/cache/apt/archives/python3.11_arm64.deb").write_bytes(b"")
        elif argv[0] == "dpkg-deb":
            (tmp / "usr/bin").mkdir(parents=True, exist_ok=True)
            (tmp / "usr/bin/python3.11").write_text("")

    tmp = tmp_path / "root.tmp-1"
    tmp.mkdir()
    monkeypatch.setattr(emu_root, "_step", step)
    monkeypatch.setattr(guest, "mounts_under", lambda p: [])
    monkeypatch.setattr(cpuinfo, "real_proc_dir", lambda r: None)
    monkeypatch.setattr(emu_root, "_pip_importable", lambda: False)
    monkeypatch.setattr(emu_root.shutil, "which", on_path("uv"))
    logs = []
    emu_root._build_root(tmp, VERSIONS, logs.append, tmp_path / "setup.log")
    argv, what = steps[-1]
    assert argv == emu_root.wheel_install_argv(["/opt/bin/uv", "pip"], tmp / guest.SITE.lstrip("/"), "3.11",
                                               VERSIONS, python=sys.executable)
    assert what == "uv pip install of the aarch64 wheels onnxruntime==1.32.0 numpy==2.4.6"
    assert any(m.startswith("  uv pip --target (aarch64 wheels): ") for m in logs)


def test_cli_setup_without_any_pip_is_one_line_before_building(tmp_path, monkeypatch, capsys):
    """Through ``pipeline device setup``: exit 2, one line, no traceback, and nothing built."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))               # no uv, pip3 or pip
    monkeypatch.setattr(emu_root, "_pip_importable", lambda: False)
    monkeypatch.setattr(emu_root, "_ensure_tools", lambda log: None)

    def never(*a, **k):
        raise AssertionError("the root must not be built")
    monkeypatch.setattr(emu_root, "_build_root", never)
    root = tmp_path / "arm64"
    assert cli.main(["device", "setup", "aarch64-emu", "--root", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "\n" not in err
    assert err.startswith("pipeline: error: device aarch64-emu: no pip found to fetch the aarch64 wheels: ")
    assert f"`{sys.executable} -m ensurepip`" in err
    assert not Path(root).exists() and not list(tmp_path.glob("arm64.tmp-*"))
