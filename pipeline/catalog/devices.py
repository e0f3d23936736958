"""Where ONNX artifacts can be benchmarked: device kind -> transport, and how a ``[[bench.devices]]`` target names
it. A transport is ``run(job_dir, device, timeout_s) -> Path of result.json`` (pipeline/devices). Adding a kind: the
transport module and one ``DEVICE_KINDS.register(...)`` with a ``match`` for its targets (docs/architecture.md).

Meta of an entry:
- ``match(target) -> bool``: whether a target string is of this kind;
- ``parse(target)``: raises ValueError with the reason when the target is malformed (optional);
- ``emulated``: its timings are not latencies (kept out of every latency table);
- ``describe``: the accepted target form, for messages.
"""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from ..core.registry import Registry

DEVICE_KINDS = Registry("device kind")

# aarch64-emu: the CPUs qemu emulates that the arm64 root's fake /proc/cpuinfo describes
# (pipeline/devices/aarch64_emu/guest.py holds their part numbers)
QEMU_CPUS = ("cortex-a72", "cortex-a76", "neoverse-n1", "max")


@dataclass(frozen=True)
class SshTarget:
    user: str | None
    host: str
    port: int | None

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host


def parse_ssh_target(target: str) -> SshTarget:
    parts = urlsplit(target)
    if parts.scheme != "ssh" or not parts.hostname:
        raise ValueError(f"expected ssh://[user@]host[:port], got {target!r}")
    if parts.password is not None:
        raise ValueError("passwords do not belong in configs: use an SSH key (ssh-agent or ~/.ssh/config)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"expected ssh://[user@]host[:port] with nothing after the port, got {target!r}")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port is not None and not 1 <= port <= 65535 or parts.netloc.endswith(":"):
        raise ValueError(f"port of {target!r} is not a number in 1..65535")
    user = parts.username
    if user is not None and (not user or user.startswith("-")):
        # ssh would read a user (or host) starting with "-" as an option
        raise ValueError(f"user of {target!r}: expected a login name, not empty and not starting with '-'")
    if parts.hostname.startswith("-"):
        raise ValueError(f"host of {target!r}: expected a host name, not one starting with '-'")
    return SshTarget(user, parts.hostname, port)


DEVICE_KINDS.register("host", "pipeline.devices.host:run", match=lambda t: t == "host", describe="host")
DEVICE_KINDS.register("aarch64-emu", "pipeline.devices.aarch64_emu.transport:run", match=lambda t: t == "aarch64-emu",
                      describe="aarch64-emu", emulated=True)
DEVICE_KINDS.register("ssh", "pipeline.devices.ssh:run", match=lambda t: t.startswith("ssh://"),
                      parse=parse_ssh_target, describe="ssh://user@host[:port]")


def kind_of(target: str) -> str:
    """The kind of a target string; ValueError naming the accepted forms when none matches."""
    for entry in DEVICE_KINDS.entries():
        if entry.meta["match"](target):
            return entry.name
    *first, last = [e.meta["describe"] for e in DEVICE_KINDS.entries()]
    raise ValueError(f"unknown device target {target!r}: expected {', '.join(first)} or {last}")


def check_target(target: str) -> str:
    """The target's kind, after its own shape check (ValueError with the reason)."""
    kind = kind_of(target)
    parse = DEVICE_KINDS[kind].meta.get("parse")
    if parse is not None:
        parse(target)
    return kind


def device_name(dev) -> str:
    """The label a device's rows carry: its ``name`` or one derived from the target."""
    if dev.name:
        return dev.name
    if dev.target == "aarch64-emu":
        return f"aarch64-emu:{dev.qemu_cpu}"
    return dev.target
