"""Model checkpoints: a plain state_dict (loadable with ``weights_only=True``) beside a JSON description of the
architecture (models/shapes.py), so a physically pruned model is rebuilt without pickling modules."""
from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from ..core.files import atomic_write_bytes, write_json


def save_model(model: torch.nn.Module, description: dict, folder: Path, stem: str = "model") -> dict[str, Path]:
    """``stem.pt`` and ``stem.json``; returns them as stage outputs ``<stem>_weights``, ``<stem>_arch``."""
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
