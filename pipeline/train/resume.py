"""Mid-stage checkpoints: a training stage killed at epoch 150 of 200 resumes at epoch 150, not 0.

The runner gives each stage a ``resume_dir`` (``RUN/.<stage>.resume``) tagged with the stage's key, so a
checkpoint is only ever resumed by the same config, inputs and code; it is deleted when the stage finishes.
A checkpoint holds everything the rest of the stage depends on -- weights, optimizer, sparsifier, the stage's
own bookkeeping and every random number generator -- so that on the CPU a resumed run ends bit-identical to an
uninterrupted one. It is written atomically (temp file + rename): a kill during the write leaves the last one.
"""
from __future__ import annotations

import io
import random
from pathlib import Path

import torch

from ..core.files import atomic_write_bytes

STATE = "state.pt"


def rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(resume_dir: Path | None, state: dict) -> None:
    if resume_dir is None:
        return
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(resume_dir) / STATE, buf.getvalue())


def load(resume_dir: Path | None) -> dict | None:
    """The last checkpoint, or None. An unreadable one (a disk that filled mid-rename, a foreign file) is
    ignored: the stage then starts from its beginning, which is always correct, only slower."""
    if resume_dir is None or not (Path(resume_dir) / STATE).is_file():
        return None
    try:
        return torch.load(Path(resume_dir) / STATE, map_location="cpu", weights_only=False)
    except Exception:   # noqa: BLE001 -- any damage means "no checkpoint"
        return None


def due(epoch_done: int, total: int, every: int) -> bool:
    """Checkpoint after ``epoch_done`` epochs? Every ``every`` epochs (0 = never), never after the last one."""
    return every > 0 and epoch_done < total and epoch_done % every == 0
