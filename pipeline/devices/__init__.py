"""Where the ONNX artifacts are benchmarked: ``host``, ``aarch64-emu`` (the real aarch64 onnxruntime build in an
arm64 Debian root under qemu-user) and ``ssh://user@host[:port]`` (a remote board) -- the kinds of
pipeline/catalog/devices.py, one transport module each.

Every device runs the same self-contained script (``export/device_bench.py``) on a job folder holding the
artifacts, the input images and ``job.json``; it writes ``result.json`` there. A transport only moves that folder
and starts the script with the device's python: ``run(job_dir, device, timeout_s) -> Path`` of the result.
A transport failure is a ``DeviceError`` whose message is one line naming the device and what went wrong.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from export import device_bench
from ..catalog.devices import DEVICE_KINDS, device_name, kind_of
from ..core.errors import UserError
from ..core.files import naming

# The script every device runs (copied into each job). Imported, not only copied, so that the code fingerprint of
# every stage that benches on a device covers it.
SCRIPT = Path(device_bench.__file__).resolve()


class DeviceError(UserError, RuntimeError):
    """A device could not be reached or the benchmark failed on it."""


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no error output"


def write_job(job_dir: Path, models: dict[str, Path], inputs: np.ndarray | None, *, settings: list[dict],
              levels: list[str] | dict[str, list[str]], warmup: int, runs: int, seed: int, predict_batch: int = 50,
              shapes: dict[str, tuple[int, ...]] | None = None, interleave: bool = True,
              seconds: float = 0.0) -> Path:
    """A self-contained job folder: artifacts (hard links when possible; ``<name>.onnx``, or ``<name>.ort`` for a
    .ort source), inputs.npy, job.json, the script.
    ``inputs`` None: timing only (then every model's input ``shapes`` without the batch are needed)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    names = {}
    for name, src in models.items():
        # the source's suffix: onnxruntime reads a .ort file as its mobile format by the name ("pruned_int8.ort")
        suffix = Path(src).suffix if Path(src).suffix in (".onnx", ".ort") else ".onnx"
        dst = job_dir / (name if name.endswith(suffix) else f"{name}{suffix}")
        if dst.exists():
            dst.unlink()
        try:
            os.link(src, dst)
        except OSError:
            with naming(dst):
                shutil.copyfile(src, dst)
        names[name] = dst.name
    if inputs is not None:
        with naming(job_dir / "inputs.npy"):
            np.save(job_dir / "inputs.npy", np.ascontiguousarray(inputs, dtype=np.float32))
    with naming(job_dir / "device_bench.py"):
        shutil.copyfile(SCRIPT, job_dir / "device_bench.py")
    job = {"models": names, "inputs": "inputs.npy" if inputs is not None else None, "predict_batch": predict_batch,
           "settings": settings, "levels": levels, "warmup": warmup, "runs": runs, "seed": seed,
           "interleave": interleave, "seconds": seconds,
           **({"shapes": {k: list(v) for k, v in shapes.items()}} if shapes else {})}
    with naming(job_dir / "job.json"):
        (job_dir / "job.json").write_text(json.dumps(job, indent=1))
    return job_dir / "job.json"


def run_on_device(dev, job_dir: Path, *, timeout_s: float = 1800.0) -> dict:
    """Run the job in ``job_dir`` on ``dev`` with its kind's transport; the parsed result.json, or DeviceError."""
    path = DEVICE_KINDS[kind_of(dev.target)].load()(job_dir, dev, timeout_s)
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DeviceError(f"device {device_name(dev)}: unreadable result {path}: {e}") from None
