"""The run folder's ``manifest.json``: what each stage produced (outputs + sha256), from which key, with which
metrics; plus the versions and git commit of the run."""
from __future__ import annotations

import json
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from ..core.errors import ManifestError
from ..core.files import sha256_file

MANIFEST = "manifest.json"


def package_versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "onnx", "onnxruntime", "onnxsim", "torch-pruning", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def git_commit() -> str | None:
    here = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}{'+dirty' if dirty and commit else ''}" if commit else None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def load_manifest(run_dir: Path) -> dict:
    """The run folder's manifest, {} for a new folder. A damaged or foreign one is refused, never replaced: it is
    the record of hours of finished stages, and rerunning them silently would throw that away."""
    path = run_dir / MANIFEST
    if not path.exists():
        return {}
    advice = "restore it, or move it aside to rerun every stage in this folder"
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: damaged, not readable JSON ({type(e).__name__} at byte "
                            f"{getattr(e, 'pos', getattr(e, 'start', '?'))}); {advice}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise ManifestError(f"{path}: not a pipeline manifest ({problem}); {advice}")
    return manifest


def _manifest_problem(manifest) -> str | None:
    if not isinstance(manifest, dict):
        return f"top level is a {type(manifest).__name__}, expected an object"
    stages = manifest.get("stages", {})
    if not isinstance(stages, dict):
        return "'stages' is not an object"
    for name, entry in stages.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("status"), str):
            return f"stage {name!r} has no status"
        outputs = entry.get("outputs", {})
        if not isinstance(outputs, dict) or not all(
                isinstance(o, dict) and isinstance(o.get("path"), str) and isinstance(o.get("sha256"), str)
                for o in outputs.values()):
            return f"stage {name!r} has malformed outputs"
    return None


def outputs_valid(run_dir: Path, entry: dict) -> bool:
    for out in entry.get("outputs", {}).values():
        path = run_dir / out["path"]
        if not path.is_file() or sha256_file(path) != out["sha256"]:
            return False
    return True


