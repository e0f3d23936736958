"""The ssh:// device transport against a real sshd on 127.0.0.1 (started here as the current user, keys only).

Needs /usr/sbin/sshd (Debian: openssh-server; .ci/run installs it); skips with that hint when it is missing.
The "remote" python is a small wrapper around this venv's interpreter that records the folder it runs in, so the
tests can check that the transport's remote temp folder existed and was removed afterwards.
"""
from __future__ import annotations

import getpass
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import DeviceConfig
from pipeline.devices import DeviceError, run_on_device, write_job

SSHD = Path("/usr/sbin/sshd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pipeline-test", "-f", str(path)],
                   check=True, timeout=30, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A throwaway sshd on 127.0.0.1:<free port>; yields (port, workdir, ssh options for $PIPELINE_SSH_OPTIONS)."""
    if not SSHD.exists():
        pytest.skip("sshd not installed: apt-get install openssh-server")
    d = tmp_path_factory.mktemp("sshd")
    _keygen(d / "host_key")
    _keygen(d / "client_key")
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    remote_tmp = d / "remote_tmp"          # the device's $TMPDIR (sent with SetEnv, allowed by AcceptEnv)
    remote_tmp.mkdir()
    port = _free_port()
    (d / "sshd_config").write_text(f"""\
ListenAddress 127.0.0.1
Port {port}
HostKey {d / 'host_key'}
AuthorizedKeysFile {d / 'authorized_keys'}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
AcceptEnv TMPDIR
Subsystem sftp internal-sftp
PidFile {d / 'sshd.pid'}
""")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)    # privilege separation dir
    log = open(d / "sshd.log", "w")
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(d / "sshd_config")], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sshd exited with {proc.returncode}: {(d / 'sshd.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"sshd did not listen on port {port}: {(d / 'sshd.log').read_text()[-2000:]}")
                time.sleep(0.05)
        opts = ["-F", "/dev/null", "-i", str(d / "client_key"), "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={d / 'known_hosts'}", "-o", f"SetEnv=TMPDIR={remote_tmp}"]
        yield port, d, opts
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()


@pytest.fixture
def ssh_env(sshd, monkeypatch):
    port, d, opts = sshd
    monkeypatch.setenv("PIPELINE_SSH_OPTIONS", shlex.join(opts))
    return port, d


def _wrapper(d: Path, name: str, body: str) -> Path:
    """A 'remote python': records its working folder, then runs ``body``."""
    w = d / name
    w.write_text(f"#!/bin/sh\necho \"$PWD\" >> {d / 'cwds.txt'}\nexport OMP_NUM_THREADS=1\n{body}\n")
    w.chmod(0o755)
    return w


def _tiny_onnx(path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    fw = numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "fw")
    fb = numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "fb")
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "tiny",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                              [w, b, fw, fb])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path.write_bytes(model.SerializeToString())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    _tiny_onnx(path)
    return path


def _job(dir_: Path, model: Path) -> Path:
    inputs = np.random.default_rng(1).random((8, 3, 32, 32), dtype=np.float32)
    write_job(dir_, {"tiny": model}, inputs, settings=[{"batch": 1, "threads": 1}], levels=["all"],
              warmup=1, runs=5, seed=0, predict_batch=4)
    return dir_


def _cwds(d: Path) -> list[str]:
    f = d / "cwds.txt"
    return f.read_text().split() if f.exists() else []


def test_ssh_device_matches_host_and_cleans_up(ssh_env, tiny_model, tmp_path):
    port, d = ssh_env
    python = _wrapper(d, "py-ok", f'exec {shlex.quote(sys.executable)} "$@"')
    dev = DeviceConfig(target=f"ssh://{getpass.getuser()}@127.0.0.1:{port}", python=str(python))
    before = _cwds(d)
    res = run_on_device(dev, _job(tmp_path / "ssh", tiny_model), timeout_s=60)
    host = run_on_device(DeviceConfig(target="host"), _job(tmp_path / "host", tiny_model), timeout_s=60)

    assert (tmp_path / "ssh" / "result.json").is_file()
    rows = res["latency"]
    assert len(rows) == 1 and rows[0]["model"] == "tiny" and rows[0]["p50_ms"] > 0 and rows[0]["runs"] == 5
    got, want = np.array(res["models"]["tiny"]["logits"]), np.array(host["models"]["tiny"]["logits"])
    assert got.shape == (8, 10)
    assert np.allclose(got, want, atol=1e-5)

    # the remote temp folder was made under the device's $TMPDIR and is gone afterwards
    new = _cwds(d)[len(before):]
    assert len(new) == 1 and Path(new[0]).parent == d / "remote_tmp", new
    assert not Path(new[0]).exists()
    assert list((d / "remote_tmp").glob("pipeline-bench.*")) == []


def test_unreachable_device_fails_fast_with_one_line(tmp_path, tiny_model, monkeypatch):
    """Needs only the ssh client, not the sshd fixture."""
    if shutil.which("ssh") is None:
        pytest.skip("ssh client not installed: apt-get install openssh-client")
    monkeypatch.setenv("PIPELINE_SSH_OPTIONS", f"-F /dev/null -o UserKnownHostsFile={tmp_path / 'known_hosts'}")
    port = _free_port()      # nothing listens there
    dev = DeviceConfig(target=f"ssh://nobody@127.0.0.1:{port}", name="board-down")
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as e:
        run_on_device(dev, _job(tmp_path, tiny_model), timeout_s=60)
    msg = str(e.value)
    assert time.monotonic() - t0 < 5
    assert "\n" not in msg and "board-down" in msg and "cannot connect to nobody@127.0.0.1" in msg and "refused" in msg.lower(), msg


def test_auth_failure_is_one_line(ssh_env, tmp_path, tiny_model, monkeypatch):
    port, d = ssh_env
    other = tmp_path / "other_key"
    _keygen(other)
    opts = ["-F", "/dev/null", "-i", str(other), "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={d / 'known_hosts'}"]
    monkeypatch.setenv("PIPELINE_SSH_OPTIONS", shlex.join(opts))
    target = f"ssh://{getpass.getuser()}@127.0.0.1:{port}"
    with pytest.raises(DeviceError) as e:
        run_on_device(DeviceConfig(target=target), _job(tmp_path / "job", tiny_model), timeout_s=60)
    msg = str(e.value)
    assert "\n" not in msg and target in msg and "authentication to" in msg and "Permission denied" in msg, msg


def test_remote_python_without_onnxruntime(ssh_env, tmp_path, tiny_model):
    port, d = ssh_env
    fake = d / "no_ort"
    (fake / "onnxruntime").mkdir(parents=True, exist_ok=True)
    (fake / "onnxruntime" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'onnxruntime'\", name='onnxruntime')\n")
    python = _wrapper(d, "py-no-ort", f'PYTHONPATH={fake} exec {shlex.quote(sys.executable)} "$@"')
    dev = DeviceConfig(target=f"ssh://{getpass.getuser()}@127.0.0.1:{port}", name="board-no-ort",
                       python=str(python))
    before = _cwds(d)
    with pytest.raises(DeviceError) as e:
        run_on_device(dev, _job(tmp_path, tiny_model), timeout_s=60)
    msg = str(e.value)
    assert "\n" not in msg and "board-no-ort" in msg and "No module named 'onnxruntime'" in msg, msg
    new = _cwds(d)[len(before):]
    assert len(new) == 1 and not Path(new[0]).exists()     # cleaned up on failure too


def test_timeout_kills_the_run_and_cleans_up(ssh_env, tmp_path, tiny_model):
    port, d = ssh_env
    python = _wrapper(d, "py-hang", "exec sleep 30")
    dev = DeviceConfig(target=f"ssh://{getpass.getuser()}@127.0.0.1:{port}", name="board-slow",
                       python=str(python))
    before = _cwds(d)
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as e:
        run_on_device(dev, _job(tmp_path, tiny_model), timeout_s=2)
    assert time.monotonic() - t0 < 8
    msg = str(e.value)
    assert "\n" not in msg and "board-slow" in msg and "within 2 s" in msg, msg
    new = _cwds(d)[len(before):]
    assert len(new) == 1 and not Path(new[0]).exists()
