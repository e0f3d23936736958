"""Code fingerprints: a stage's result depends on its code as much as on its config.

The fingerprint of a stage is a sha256 over the project's version and the source of its module, of the
implementations its catalog tables name (``Stage.code_modules``), and of every module they import from this
project (``pipeline``, ``models``, ``export``, and the module's own top-level package), found by parsing the
import statements (function-level imports included), transitively. Changing ``pipeline/algorithms/rgsm.py`` thus
changes the fingerprint of ``prune`` (whose sparsifier table names it) but not of ``train``.

Stages never import the config package: they read the config as values, which every stage key hashes already.
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
    """Absolute names of the modules ``name`` (at ``path``) imports: ``from x import y`` imports the module x.y
    when there is one, else x."""
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
            # `from pkg import mod` depends on pkg.mod, not on pkg's __init__; `from mod import name` on mod
            names = [f"{base}.{alias.name}" for alias in node.names]
            modules = [m for m in names if _source_file(m) is not None]
            if len(modules) < len(names):
                out.add(base)
            out.update(modules)
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


def closure(*modules: str) -> dict[str, str]:
    """The union of the modules' closures: module name -> source file."""
    seen = {}
    for module in modules:
        seen.update(module_closure(module))
    return seen


def code_digests(*modules: str) -> dict[str, str]:
    """Module name -> short sha256 of its source, over the modules' closures: what a manifest entry records so
    that a rerun can say which module changed."""
    return {name: hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
            for name, path in sorted(closure(*modules).items())}


@functools.lru_cache(maxsize=None)
def code_fingerprint(*modules: str) -> str:
    """sha256 over the project's version and the sources of the modules' closures; cached per process."""
    seen = closure(*modules)
    try:
        version = metadata.version(DIST)
    except metadata.PackageNotFoundError:
        version = "unknown"
    h = hashlib.sha256(version.encode())
    for name in sorted(seen):
        h.update(name.encode() + b"\0" + Path(seen[name]).read_bytes() + b"\0")
    return h.hexdigest()
