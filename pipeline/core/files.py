"""Writing files so that a crash never leaves half of one: temp file in the same folder, fsync, rename. And the
hashes the manifest records. The one atomic writer of the project."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int | None = None) -> None:
    """``data`` to ``path`` in whole or not at all. The file gets ``mode``, or by default what any new file would
    (0644 under umask 022, not mkstemp's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Named before it is made (as mkstemp would, O_EXCL), so that an interruption anywhere -- Ctrl-C or SIGTERM
    # between the file's creation and the return of mkstemp included -- still removes it.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = -1
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        os.chmod(tmp, (0o666 & ~_umask()) if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if not (isinstance(e, FileExistsError) and fd == -1):   # (that one is another writer's file)
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)   # as naming(): write, flush and fsync name no file
        raise


@contextlib.contextmanager
def naming(path: str | Path):
    """An OSError inside that names no file gets ``path``: a write, flush, fsync or copy that fails with "No space
    left on device" says nothing of where, and the CLI's one line should."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def atomic_write_text(path: str | Path, text: str, *, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode(), mode=mode)


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
