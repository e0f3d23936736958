"""Stage ``latency``: the latency table of the budget device, for ``prune.budget = "latency"`` (otherwise it records
that none is needed and measures nothing).

Every unit the budget can ask for -- the stem, each residual block at each combination of its input, internal and
output widths, the head (pipeline/algorithms/latency.py) -- is exported alone and timed with onnxruntime on the
device of ``prune.budget_device``, at batch 1, one thread and level ``all`` (the bench's headline setting),
all interleaved in one process; the whole dense graph too, so that the table's prediction can be offset to it.
Timings are cached per device, onnxruntime version, CPU and setting (``$PIPELINE_CACHE_DIR`` or
``~/.cache/pipeline``, ``latency/``): a second run, or another target, measures only what is new. Without
either (no home folder) every run measures and nothing is cached."""
from __future__ import annotations

import hashlib
import json
import platform
import shutil
import tempfile
from pathlib import Path

import torch

from models import create_model, set_noise

from ..algorithms.groups import coupled_families
from ..algorithms.latency import network_units, signatures, unit_cost, unit_module
from ..catalog.devices import DEVICE_KINDS, device_name, kind_of
from ..core.errors import UserError
from ..core.files import write_json
from ..core.paths import HomeMissing, home_cache
from ..devices.hardware import resolve_align
from ..run.stage import Stage, StageContext, StageResult
from ..train.setup import image_shape, model_kwargs
from ..train.sparsify import allowed_widths

LEVEL, BATCH, THREADS = "all", 1, 1
METHOD = "steady-v2"   # how units are timed (each warm, back to back; noop overhead): part of the cache key
FULL = "full"          # the table key of the whole dense graph


def cache_dir() -> Path:
    """$PIPELINE_CACHE_DIR, else ~/.cache/pipeline; HomeMissing when that is needed and there is no home folder."""
    return home_cache("PIPELINE_CACHE_DIR", what="timing cache", hint="a folder for it")


def device_identity(dev) -> dict:
    """What a timing depends on besides the graph: the device, and for the host its CPU and onnxruntime."""
    import onnxruntime

    from export.device_bench import cpu_model

    identity = {"target": dev.target, "name": device_name(dev), "level": LEVEL, "batch": BATCH,
                "threads": THREADS, "method": METHOD}
    if kind_of(dev.target) == "host":
        identity.update(onnxruntime=onnxruntime.__version__, cpu=cpu_model(), machine=platform.machine())
    else:
        identity.update(python=dev.python)
    return identity


def budget_device_of(cfg):
    wanted = cfg.prune.budget_device
    return next(d for d in cfg.bench.devices if (device_name(d) == wanted if wanted else d.target == "host"))


def _export(module: torch.nn.Module, shape, path: Path, opset: int) -> None:
    module.eval()
    with torch.no_grad():
        torch.onnx.export(module, (torch.rand(shape),), str(path), dynamo=False, opset_version=min(opset, 23),
                          input_names=["x"], output_names=["y"])


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    if cfg.prune.budget != "latency":
        write_json(ctx.out_dir / "table.json", {"used": False})
        return StageResult({"table": ctx.out_dir / "table.json"}, {"used": False})
    doc = latency_table(cfg, ctx.log)
    write_json(ctx.out_dir / "table.json", doc)
    return StageResult({"table": ctx.out_dir / "table.json"},
                       {"used": True, "device": doc["device"], "units": len(doc["units"]), "full_ms": doc["full_ms"],
                        "offset_ms": doc["offset_ms"]})


def latency_table(cfg, log=print) -> dict:
    """The table of the config's budget device: every unit signature the budget can ask for -> p50 ms, the dense
    graph's p50 and the offset (dense graph minus its units), from the cache or measured now. Whether it was
    measured now is only logged: a table read from the cache must be the same output as the one first measured,
    so that the prune stage, which reads it, keeps its result."""
    from ..devices import run_on_device, write_job

    dev = budget_device_of(cfg)
    shape = image_shape(cfg)
    if shape != (3, 32, 32):
        raise UserError(f"prune.budget = \"latency\": the latency table's units are measured on 3x32x32 images, "
                        f"these are {'x'.join(map(str, shape))}; use prune.budget = \"macs\"")
    model = create_model(cfg.model.arch, **model_kwargs(cfg)).eval()
    example = torch.rand(2, *shape, generator=torch.Generator().manual_seed(cfg.seed))
    families = coupled_families(model, example)
    options = allowed_widths(model, families, resolve_align(cfg.prune.align))
    units = network_units(model, families)
    full_key = f"{FULL}:{cfg.model.arch}:{cfg.model.ensemble}:{cfg.model.normalize}"
    wanted = [*signatures(units, options), full_key]
    try:   # before device_identity imports onnxruntime, which may make a home folder of its own
        cache_root = cache_dir()
    except HomeMissing as e:     # measure everything, keep nothing: never create a /nonexistent/... tree
        cache_root = None
        log(f"no cache: {e}")
    identity = device_identity(dev)
    cache_file = None if cache_root is None else cache_root / "latency" / (
        hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16] + ".json")
    try:
        cached = json.loads(cache_file.read_text())["units"] if cache_file is not None else {}
    except (OSError, ValueError, KeyError):
        cached = {}
    missing = [s for s in wanted if s not in cached]
    cached_in = f"{len(wanted) - len(missing)} cached in {cache_file}, " if cache_file is not None else ""
    log(f"{len(wanted)} units for {device_name(dev)} ({LEVEL}, batch {BATCH}, {THREADS} thread): "
        f"{cached_in}{len(missing)} to measure")
    if missing:
        tmp = Path(tempfile.mkdtemp(prefix="pipeline-latency-"))
        try:
            paths, shapes = {}, {}
            for i, sig in enumerate(missing):
                if sig == full_key:
                    module, shape = create_model(cfg.model.arch, **model_kwargs(cfg)), (1, *image_shape(cfg))
                    set_noise(module, False)
                else:
                    module, shape = unit_module(sig)
                name = f"u{i}"
                _export(module, shape, tmp / f"{name}.onnx", cfg.export.opset)
                paths[name], shapes[name] = tmp / f"{name}.onnx", shape[1:]
            job = tmp / "job"
            write_job(job, paths, None, settings=[{"batch": BATCH, "threads": THREADS}], levels=[LEVEL],
                      warmup=max(cfg.bench.warmup, 10), runs=max(cfg.bench.runs, 100), seed=cfg.seed, shapes=shapes,
                      interleave=False)
            result = run_on_device(dev, job, timeout_s=dev.timeout_s)
            log(f"measured on onnxruntime {result['runtime']['onnxruntime']}, {result['runtime']['cpu']}")
            for row in result["latency"]:
                cached[missing[int(row["model"][1:])]] = row["p50_ms"]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_json(cache_file, {"identity": identity, "units": cached})
    table = {s: cached[s] for s in wanted}
    dense_units = sum(unit_cost(table, u, *u.fixed) for u in units)
    offset = table[full_key] - dense_units
    log(f"dense graph {table[full_key]:.3f} ms = units {dense_units:.3f} ms + offset {offset:.3f} ms")
    return {"used": True, "device": device_name(dev), "identity": identity, "level": LEVEL,
            "batch": BATCH, "threads": THREADS, "units": {s: table[s] for s in wanted if s != full_key},
            "full_ms": table[full_key], "offset_ms": offset,
            "cache": str(cache_file) if cache_file is not None else None}


STAGE = Stage("latency", sections=("seed", "model", "prune", "bench"), inputs=(), run=run, tables=(DEVICE_KINDS,))
