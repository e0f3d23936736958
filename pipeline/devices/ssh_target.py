"""``ssh://[user@]host[:port]`` parsing (no I/O), shared by config validation and the ssh transport."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit


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
        raise ValueError(f"port of {target!r} is not a number in 1..65535") from None
    return SshTarget(parts.username, parts.hostname, port)
