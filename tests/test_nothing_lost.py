"""What the user sees on stderr stays one line and useful: library warnings only with --debug, a full disk's line
names the file, and no home folder is a one-line error naming the variable to set (never a /nonexistent/... tree).
SIGTERM: tests/test_sigterm.py."""
import errno
import sys
import types
import warnings
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import DeviceConfig, load_config
from pipeline.core import files
from pipeline.core.paths import HomeMissing, home_cache

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke.toml")
ENV_VARS = ("PIPELINE_DATA_ROOT", "PIPELINE_ARM_ROOT", "PIPELINE_CACHE_DIR")


def _to_stderr(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


# --------------------------------------------------------------------------------------------- library warnings
def test_library_warnings_reach_stderr_only_with_debug(monkeypatch, capsys):
    import pipeline.config

    show_lines = pipeline.config.show_lines

    def noisy(cfg):   # as matplotlib or numpy would, in the middle of a command
        warnings.warn("a library warning", UserWarning)
        return show_lines(cfg)

    monkeypatch.setattr(pipeline.config, "show_lines", noisy)

    def run(*extra):
        with warnings.catch_warnings():   # a fresh interpreter's display, not pytest's warning capture
            warnings.simplefilter("always")
            warnings.showwarning = _to_stderr
            rc = main(["show-config", "--config", SMOKE, *extra])
        return rc, capsys.readouterr()

    rc, quiet = run()
    assert rc == 0 and "name = " in quiet.out and quiet.err == ""
    rc, loud = run("--debug")
    assert rc == 0 and "UserWarning: a library warning" in loud.err


# --------------------------------------------------------------------------------------------- disk full
def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_names_the_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    monkeypatch.setattr(files.os, "fsync", _full)
    target = tmp_path / "sub" / "x.json"
    with pytest.raises(OSError) as e:
        files.write_json(target, {"a": 1})
    assert (e.value.errno, e.value.strerror, e.value.filename) == (errno.ENOSPC, "No space left on device", str(target))
    assert list(target.parent.iterdir()) == []


def test_naming_fills_in_only_a_missing_file_name(tmp_path):
    with pytest.raises(OSError) as e, files.naming(tmp_path / "a"):
        _full()
    assert e.value.filename == str(tmp_path / "a") and e.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as e, files.naming(tmp_path / "a"):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "b"))
    assert e.value.filename == str(tmp_path / "b")


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(files.os, "fsync", _full)
    out = tmp_path / "run"
    assert main(["run", "--config", SMOKE, "--out", str(out), "--until", "train"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err, err
    assert err.startswith(f"pipeline: error: {out}/"), err


# --------------------------------------------------------------------------------------------- no home folder
@pytest.fixture
def no_home(tmp_path, monkeypatch) -> Path:
    gone = tmp_path / "gone"
    monkeypatch.setenv("HOME", str(gone))
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return gone


def test_home_cache_without_a_home_folder(no_home, tmp_path, monkeypatch):
    with pytest.raises(HomeMissing) as e:
        home_cache("PIPELINE_DATA_ROOT", "data", what="CIFAR-10 folder")
    msg = str(e.value)
    assert "\n" not in msg and str(no_home) in msg and "$PIPELINE_DATA_ROOT" in msg and "~/.cache/pipeline/data" in msg
    monkeypatch.setenv("PIPELINE_DATA_ROOT", str(tmp_path / "data"))
    assert home_cache("PIPELINE_DATA_ROOT", "data", what="x") == tmp_path / "data"   # the variable needs no home
    monkeypatch.setenv("HOME", str(tmp_path))
    assert home_cache("PIPELINE_CACHE_DIR", what="x") == tmp_path / ".cache" / "pipeline"
    assert not no_home.exists()


def test_home_unset_with_a_passwd_entry_of_nonexistent(monkeypatch):
    import pwd

    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("PIPELINE_ARM_ROOT", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: types.SimpleNamespace(pw_dir="/nonexistent"))
    with pytest.raises(HomeMissing, match=r"the home folder /nonexistent does not exist.*\$PIPELINE_ARM_ROOT"):
        home_cache("PIPELINE_ARM_ROOT", "aarch64-root", what="arm64 root")


def test_no_data_root_is_one_line_naming_the_variable(no_home, tmp_path, capsys):
    assert main(["run", "--config", SMOKE, "--out", str(tmp_path / "run"), "--until", "train"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"pipeline: error: the home folder {no_home} does not exist, so there is no default CIFAR-10 "
                   "folder (~/.cache/pipeline/data); set $PIPELINE_DATA_ROOT to a folder holding "
                   "cifar-10-batches-py (or set data.root)")
    assert not no_home.exists()


def test_no_arm_root_is_one_line_for_the_command_and_a_device_error_for_a_bench_device(no_home, capsys):
    from pipeline.devices import DeviceError
    from pipeline.devices.aarch64_emu import guest

    assert main(["device", "check", "aarch64-emu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "$PIPELINE_ARM_ROOT" in err and str(no_home) in err, err
    with pytest.raises(DeviceError, match=r"device aarch64-emu:neoverse-n1: the home folder .*\$PIPELINE_ARM_ROOT"):
        guest.root_of(DeviceConfig(target="aarch64-emu", qemu_cpu="neoverse-n1"))
    mine = DeviceConfig(target="aarch64-emu", qemu_cpu="neoverse-n1", root="/some/root")
    assert "--root /some/root" in str(guest.missing_root_error(mine, Path("/some/root")))
    assert not no_home.exists()


def test_the_latency_table_is_measured_uncached_without_a_home_folder(no_home, monkeypatch):
    from pipeline.stages.latency import latency_table

    # onnxruntime (>= 1.29, Linux) writes a telemetry device id under ~/.cache/Microsoft on import, making the
    # home folder itself unless told not to (here, and in the device subprocess that times the units)
    monkeypatch.setenv("ORT_DISABLE_TELEMETRY", "1")

    cfg = load_config(SMOKE, ["prune.groups=coupled", "prune.align=2", "prune.budget=latency", "prune.target=1.5"])
    logged = []
    doc = latency_table(cfg, logged.append)
    assert doc["cache"] is None and doc["units"] and doc["full_ms"] > 0
    assert [m for m in logged if m.startswith("no cache: ")] == [
        f"no cache: the home folder {no_home} does not exist, so there is no default timing cache "
        "(~/.cache/pipeline); set $PIPELINE_CACHE_DIR to a folder for it"]
    assert not no_home.exists()
