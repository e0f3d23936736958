"""The layout's contract (docs/architecture.md): no import cycles, no stage importing another stage, and stage
keys that change only when their own stage's code does."""
import ast
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "models", "export")


def project_modules(root: Path = REPO) -> dict[str, Path]:
    """Every module of the project's packages: dotted name -> file."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) \
                if node.level else node.module
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def stage_modules() -> list[str]:
    from pipeline.stages import STAGES

    return [s.run.__module__ for s in STAGES]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_a_stage_imports_no_other_stage_directly_or_through_helpers():
    from pipeline.run.fingerprint import closure
    from pipeline.stages import STAGES

    stages = set(stage_modules())
    graph = import_graph()
    for stage in STAGES:
        module = stage.run.__module__
        assert not (graph[module] & stages), f"{module} imports {graph[module] & stages}"
        code = set(closure(*stage.code_modules))
        others = (code & stages) - {module}
        assert not others, f"{module}'s code fingerprint covers other stages: {others}"
        # a stage reads its config as values, which its key hashes: config code is no part of any result
        assert not {m for m in code if m.startswith("pipeline.config")}, f"{module}'s code covers the config"


# docs/architecture.md's table: what each room may import from the project (prefixes)
ROOMS = {
    "pipeline.core": ("pipeline.core",),
    "pipeline.catalog": ("pipeline.core", "pipeline.catalog"),
    "pipeline.config": ("pipeline.core", "pipeline.catalog", "pipeline.config", "models"),
    "models": ("models",),
    "pipeline.algorithms": ("pipeline.algorithms", "models"),
    "pipeline.devices": ("pipeline.core", "pipeline.catalog", "pipeline.config", "pipeline.devices",
                         "export.device_bench"),
    "pipeline.train": ("pipeline.core", "pipeline.catalog", "pipeline.algorithms", "pipeline.train",
                       "pipeline.devices.hardware", "models"),
    "export": ("export", "models"),
    "pipeline.run": ("pipeline.core", "pipeline.config", "pipeline.run", "pipeline.train.distributed", "models"),
    "pipeline.stages": ("pipeline.core", "pipeline.catalog", "pipeline.run.stage", "pipeline.run.checkpoints",
                        "pipeline.train", "pipeline.algorithms", "pipeline.devices", "export", "models",
                        "pipeline.stages"),
    "pipeline.report": ("pipeline.core", "pipeline.catalog", "pipeline.report"),
    "pipeline.tools": ("pipeline.core", "pipeline.config", "pipeline.train", "pipeline.tools", "models"),
    "pipeline.cli": ("pipeline", "models", "export"),
}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_each_room_imports_only_what_docs_architecture_allows():
    graph = import_graph()
    for module, imported in graph.items():
        if module == "pipeline":
            continue
        room = max((r for r in ROOMS if _within(module, r)), key=len, default=None)
        assert room is not None, f"{module} is in no room of docs/architecture.md"
        bad = sorted(m for m in imported if not any(_within(m, ok) for ok in ROOMS[room]))
        assert not bad, f"{module} ({room}) imports {bad}"
    doc = (REPO / "docs" / "architecture.md").read_text()
    assert all(f"`{r.replace('.', '/')}/`" in doc for r in ROOMS), "a room of the test is missing from the doc"


def test_the_cycle_and_stage_checks_can_fail():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_train_stage_code_holds_no_device_eval_report_or_export_module():
    from pipeline.run.fingerprint import closure as code_closure
    from pipeline.stages import evaluate, train

    closure = set(code_closure(*train.STAGE.code_modules))
    robustness = evaluate.evaluate_model.__module__     # the module that scores attacks: eval's, not train's
    unwanted = {m for m in closure if m.startswith(("pipeline.devices", "pipeline.report", "export"))
                or m == robustness}
    assert not unwanted, f"the train stage's key would change when these change: {sorted(unwanted)}"


# Run in a copy of the sources: the stages' code fingerprints before and after editing one file at a time.
_PROBE = r"""
import json, sys
from pathlib import Path
from pipeline.run.fingerprint import code_fingerprint
from pipeline.stages import STAGES

def codes():
    code_fingerprint.cache_clear()
    return {s.name: code_fingerprint(*s.code_modules) for s in STAGES}

base, changed = codes(), {}
for rel in sys.argv[1:]:
    path = Path(rel)
    text = path.read_text()
    path.write_text(text + "\n# edited\n")
    now = codes()
    changed[rel] = sorted(k for k in base if now[k] != base[k])
    path.write_text(text)
print(json.dumps(changed))
"""


def test_editing_a_device_module_reruns_only_bench_and_eval_code_spares_training(tmp_path):
    copy = tmp_path / "src"
    for package in PACKAGES:
        shutil.copytree(REPO / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    devices = sorted(str(p.relative_to(copy)) for p in (copy / "pipeline" / "devices").rglob("*.py"))
    robustness = sys.modules[__import__("pipeline.stages.evaluate", fromlist=["x"]).evaluate_model.__module__]
    eval_only = str(Path(robustness.__file__).relative_to(REPO))
    assert devices
    proc = subprocess.run([sys.executable, "-c", _PROBE, *devices, eval_only], cwd=copy, capture_output=True,
                          text=True, env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    changed = json.loads(proc.stdout)
    # setup/check-only modules change no stage; the transports change bench and latency (which times the budget's
    # latency table on a device) alone -- and hardware.py: the NCHWc block that prune.align = "auto" resolves to
    # is part of the prune stage's result (and of the widths the latency table measures)
    hardware = "pipeline/devices/hardware.py"
    for rel in devices:
        allowed = {"prune", "latency"} if rel == hardware else {"bench", "latency"}
        assert set(changed[rel]) <= allowed, f"editing {rel} changes the code of {changed[rel]}"
    assert changed[hardware] == ["latency", "prune"]
    assert any(changed[rel] == ["bench", "latency"] for rel in devices)
    assert "train" not in changed[eval_only] and "prune" not in changed[eval_only] and "eval" in changed[eval_only]
