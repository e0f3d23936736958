"""Code fingerprints: a stage's result depends on its code as much as on its config.

The fingerprint of a module is a sha256 over the project's version and the source of that module and of every
module it imports from this project (``pipeline``, ``models``, ``export``, and the module's own top-level
package), found by parsing the import statements (function-level imports included), transitively. Changing
``pipeline/algorithms/rgsm.py`` thus changes the fingerprint of ``prune`` (which imports it) but not of
``train`` (which does not).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from importlib import metadata
from pathlib import Path

PROJECT_PACKAGES = ("pipeline", "models", "export")
DIST = "sparse-robust-pipeline"


def _source_file(name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    origin = spec.origin if spec else None
    return origin if origin and origin.endswith(".py") else None


def _imports(name: str, path: str) -> set[str]:
    """Absolute names of the modules ``name`` (at ``path``) imports, submodules of ``from x import y`` included."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(Path(path).read_bytes(), path)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            try:
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) \
                    if node.level else node.module
            except ImportError:
                continue
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def module_closure(module: str) -> dict[str, str]:
    """``module`` and the project modules it imports, transitively: module name -> source file."""
    roots = set(PROJECT_PACKAGES) | {module.partition(".")[0]}
    seen: dict[str, str] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _source_file(name)
        if path is None:
            continue
        seen[name] = path
        # Parent packages' __init__ files are not followed: they gather modules (pipeline.stages imports every
        # stage), so counting them would make each stage depend on all the others.
        todo.extend(m for m in _imports(name, path) if m.partition(".")[0] in roots)
    return seen


@functools.lru_cache(maxsize=None)
def code_fingerprint(module: str) -> str:
    """sha256 over the project's version and the sources of ``module_closure(module)``; cached per process."""
    seen = module_closure(module)
    try:
        version = metadata.version(DIST)
    except metadata.PackageNotFoundError:
        version = "unknown"
    h = hashlib.sha256(version.encode())
    for name in sorted(seen):
        h.update(name.encode() + b"\0" + Path(seen[name]).read_bytes() + b"\0")
    return h.hexdigest()
