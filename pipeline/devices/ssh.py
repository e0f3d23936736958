"""``ssh://[user@]host[:port]`` transport: copy the job folder to a board, run the script there, fetch result.json.

Only the system ``ssh``/``scp`` are used, so everything the user already set up for them applies (``~/.ssh/config``
host aliases and keys, ssh-agent, ProxyJump). Options always passed:

* ``BatchMode=yes``: keys only; a missing key fails at once instead of waiting on a password prompt nobody sees.
* ``ConnectTimeout=10`` and ``ServerAliveInterval=15``: a dead host or a dropped link fails within about a minute.
* ``StrictHostKeyChecking=accept-new``: BatchMode cannot answer the "trust this host?" question, so with the
  default (``ask``) the very first run against a new board would fail. ``accept-new`` records an unknown host's key
  on first contact but still refuses a *changed* key, which is the case that actually signals an impostor.
* ``LogLevel=ERROR``: drops the "Permanently added ... to known hosts" notice, so the last stderr line (the one
  quoted in a DeviceError) is the real error.

``$PIPELINE_SSH_OPTIONS`` (shlex-split) is put in front of these, e.g. ``-i ~/.ssh/board -o
UserKnownHostsFile=/tmp/kh``. ssh keeps the first value it sees for an option, so these also override the defaults
above. Prefer ``~/.ssh/config`` for anything permanent; the variable is for one-off runs and the tests.

Steps: ``mktemp -d`` on the device, scp the job files there, run ``<python> device_bench.py job.json
result.json`` in that folder, scp result.json back into the job folder, and always (best effort) remove the remote
folder. Every subprocess has a timeout: the benchmark's ``timeout_s`` counts from the start of ``run``; the
remote command is also wrapped in the device's ``timeout`` (when it has one) so it does not outlive the run.
The commands sent assume a POSIX login shell on the device (sh, bash, ash/busybox).
"""
from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

from ..catalog.devices import SshTarget, device_name, parse_ssh_target
from . import DeviceError, last_line

OPTIONS_ENV = "PIPELINE_SSH_OPTIONS"
DEFAULT_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15",
                   "-o", "StrictHostKeyChecking=accept-new", "-o", "LogLevel=ERROR")
SHORT_S = 30.0          # mktemp and rm: connect (<= 10 s) plus a trivial command
GRACE_S = 15.0          # local backstop after the remote `timeout` should have fired
RESULT = "result.json"
SETUP = "creating the remote folder"
_REMOTE_DIR = re.compile(r"^/[A-Za-z0-9._/-]*/pipeline-bench\.[A-Za-z0-9]+$")


def _options() -> list[str]:
    return [*shlex.split(os.environ.get(OPTIONS_ENV, "")), *DEFAULT_OPTIONS]


def _remote_spec(t: SshTarget, path: str) -> str:
    host = f"[{t.host}]" if ":" in t.host else t.host      # IPv6 literal
    return f"{t.user}@{host}:{path}" if t.user else f"{host}:{path}"


class _Session:
    def __init__(self, dev):
        self.dev = dev
        self.name = device_name(dev)
        self.target = parse_ssh_target(dev.target)

    def fail(self, what: str) -> DeviceError:
        return DeviceError(f"device {self.name}: {what}")

    def _exec(self, cmd: list[str], step: str, timeout_s: float, said_s: float | None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout_s, 1.0),
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            limit = said_s if said_s is not None else timeout_s
            raise self.fail(f"{step} did not finish within {limit:.0f} s") from None
        except OSError as e:     # no ssh/scp binary
            raise self.fail(f"{step}: cannot start {cmd[0]}: {e}") from None

    def connection_error(self, step: str, stderr: str) -> DeviceError:
        # scp ends with "scp: Connection closed" after ssh's own reason; quote the reason
        lines = [ln for ln in (stderr or "").splitlines() if ln.strip()]
        reasons = [ln for ln in lines if "connection closed" not in ln.lower()]
        line = last_line("\n".join(reasons or lines))
        low, dest = line.lower(), self.target.destination
        if "permission denied" in low or "too many authentication failures" in low:
            what = f"authentication to {dest} failed (keys only, BatchMode=yes)"
        elif "host key verification failed" in low or "identification has changed" in stderr.lower():
            what = f"host key of {dest} does not match known_hosts"
        elif "subsystem request failed" in low:
            what = f"no sftp subsystem in the sshd of {dest} (scp needs it)"
        else:
            what = f"cannot connect to {dest}"
        during = "" if step == SETUP else f" during {step}"
        return self.fail(f"{what}{during}: {line}")

    def ssh(self, command: str, step: str, timeout_s: float, said_s: float | None = None):
        port = ["-p", str(self.target.port)] if self.target.port else []
        p = self._exec(["ssh", *_options(), *port, self.target.destination, command], step, timeout_s, said_s)
        if p.returncode == 255:
            raise self.connection_error(step, p.stderr)
        return p

    def scp(self, args: list[str], step: str, timeout_s: float, said_s: float | None = None) -> None:
        # no -q: it would also silence ssh's reason for a failed connection
        port = ["-P", str(self.target.port)] if self.target.port else []
        p = self._exec(["scp", *_options(), *port, *args], step, timeout_s, said_s)
        if p.returncode == 255:     # ssh could not connect / authenticate
            raise self.connection_error(step, p.stderr)
        if p.returncode != 0:
            raise self.fail(f"{step} failed (scp exit {p.returncode}): {last_line(p.stderr)}")


def run(job_dir: Path, dev, timeout_s: float) -> Path:
    job_dir = Path(job_dir)
    deadline = time.monotonic() + timeout_s
    s = _Session(dev)
    result = job_dir / RESULT
    result.unlink(missing_ok=True)          # never mistake a stale result for this run's
    files = sorted(str(f) for f in job_dir.iterdir() if f.is_file() and not f.name.startswith(RESULT))

    p = s.ssh("mktemp -d \"${TMPDIR:-/tmp}/pipeline-bench.XXXXXX\"", SETUP,
              min(SHORT_S, timeout_s))
    remote = p.stdout.strip().splitlines()[-1].strip() if p.stdout.strip() else ""
    if p.returncode != 0:
        raise s.fail(f"mktemp -d failed on the device (exit {p.returncode}): {last_line(p.stderr)}")
    if not _REMOTE_DIR.match(remote):     # also guards the rm -rf below
        raise s.fail(f"mktemp -d on the device gave an unusable folder name {remote!r}")
    try:
        s.scp([*files, _remote_spec(s.target, remote + "/")], "upload", deadline - time.monotonic(),
              timeout_s)

        left = deadline - time.monotonic()
        py = " ".join(shlex.quote(w) for w in shlex.split(dev.python)) or "python3"
        bench = f"{py} device_bench.py job.json {RESULT}"
        secs = max(1, math.ceil(left))
        command = (f"cd {shlex.quote(remote)} && if timeout -k 5 1 true >/dev/null 2>&1; "
                   f"then exec timeout -k 5 {secs} {bench}; else exec {bench}; fi")
        p = s.ssh(command, "benchmark", left + GRACE_S, timeout_s)
        if p.returncode == 124:
            raise s.fail(f"benchmark did not finish within {timeout_s:.0f} s")
        if p.returncode == 127:
            raise s.fail(f"remote python {dev.python!r} not found: {last_line(p.stderr)}")
        if p.returncode != 0:
            raise s.fail(f"benchmark failed on the device (exit {p.returncode}): {last_line(p.stderr)}")

        part = job_dir / (RESULT + ".part")
        s.scp([_remote_spec(s.target, f"{remote}/{RESULT}"), str(part)], "download of result.json",
              max(deadline - time.monotonic(), SHORT_S))
        os.replace(part, result)
    finally:
        (job_dir / (RESULT + ".part")).unlink(missing_ok=True)
        try:     # best effort: a failed cleanup must not mask the run's own error
            s.ssh(f"rm -rf {shlex.quote(remote)}", "cleanup", SHORT_S)
        except DeviceError:
            pass
    if not result.is_file():
        raise s.fail(f"no {RESULT} came back from {remote}")
    return result
