"""Small file helpers: atomic writes, hashes, model checkpoints (state_dict + JSON description)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch


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


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes 0600 files; artifacts get the mode any other new file would (0644 under umask 022)
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def save_model(model: torch.nn.Module, description: dict, folder: Path, stem: str = "model") -> dict[str, Path]:
    """``stem.pt`` (a plain state_dict, loadable with weights_only=True) and ``stem.json`` (architecture)."""
    import io

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    atomic_write_bytes(folder / f"{stem}.pt", buf.getvalue())
    write_json(folder / f"{stem}.json", description)
    return {f"{stem}_weights": folder / f"{stem}.pt", f"{stem}_arch": folder / f"{stem}.json"}


def load_model(weights: str | Path, arch: str | Path, device="cpu") -> torch.nn.Module:
    from models import build_from_description

    description = json.loads(Path(arch).read_text())
    model = build_from_description(description)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.to(device)
