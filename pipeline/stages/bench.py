"""Stage ``bench``: every ONNX artifact (dense/pruned x deterministic/stochastic/per_sample/int8) on every device of
``bench.devices`` -- ``host``, ``aarch64-emu`` (the real aarch64 onnxruntime build under qemu-user) or
``ssh://user@host`` -- with one self-contained script per device (export/device_bench.py) that times all
artifacts interleaved in one process and predicts a seeded test subset.

Per device: latency (p50/p90/p99/mean) per artifact x setting, natural accuracy, and top-1 agreement of the
deterministic and int8 artifacts with the host's onnxruntime. Emulated timings measure the emulator, not ARM
silicon: they are kept apart (``emulated: true``) and never enter a latency table. A device that fails (unreachable,
no onnxruntime, timeout) is recorded with its one-line error; the other devices' results are kept.

On the host the deterministic dense and pruned graphs are timed at every level of ``bench.optimizations``: a user
runs the level that is fastest for *their* model, so the headline speed-up is dense-best / pruned-best per setting,
never a pruned level against a slower dense one. The other artifacts are timed at level ``all``.

The mobile stage's ``.ort`` files are artifacts too, named ``<name>.ort`` (``dense.ort``, ``pruned_int8.ort``) with
the model and variant of their .onnx and ``format: "ort"`` (the .onnx rows: ``"onnx"``): timed at level ``all`` on
every device in the same interleaved process and checked against the host's predictions of the same file. The
headline speed-up, the noise overhead and the int8 change compare .onnx artifacts only."""
from __future__ import annotations

import os
import re
import shutil

import numpy as np

from ..catalog.artifacts import (AGREEMENT_VARIANTS, DEPLOYED, SOURCES, artifact_name, artifact_path, artifacts,
                                 ort_artifacts, ort_key)
from ..catalog.devices import DEVICE_KINDS, device_name, kind_of
from ..core import seeds
from ..core.files import write_json
from ..run.checkpoints import load_model
from ..run.stage import Stage, StageContext, StageResult
from ..train.data import to_float
from ..train.loop import evaluate
from ..train.setup import data_splits

# the deterministic artifacts (named like their models) -> the stage whose torch model each one exports
DETERMINISTIC = {artifact_name(m, "deterministic"): SOURCES[m] for m in DEPLOYED}


def thread_counts(requested) -> list[int]:
    """``bench.threads`` with 0 resolved to all cores, duplicates dropped, order kept."""
    out = []
    for t in requested:
        t = t or os.cpu_count() or 1
        if t not in out:
            out.append(t)
    return out


def best_rows(rows: list[dict]) -> dict[tuple[int, int], dict]:
    """(batch, threads) -> the row with the lowest p50 over the optimisation levels."""
    best = {}
    for r in rows:
        k = (r["batch"], r["threads"])
        if k not in best or r["p50_ms"] < best[k]["p50_ms"]:
            best[k] = r
    return best


# Under emulation one ResNet20 inference takes ~0.3 s and the timings are not latencies anyway: unless the device
# entry says otherwise, an emulated device predicts 64 images and times batch 1, one thread, level all, 10 runs.
EMULATED_DEFAULTS = {"runs": 10, "warmup": 2, "batches": [1], "threads": [1], "levels": ["all"], "images": 64,
                     "seconds": 0.0}


def device_plan(dev, b) -> dict:
    """A device's settings: its own values where set, else the ``[bench]`` ones (emulated: EMULATED_DEFAULTS)."""
    base = dict(EMULATED_DEFAULTS) if DEVICE_KINDS[kind_of(dev.target)].meta.get("emulated") else {
        "runs": b.runs, "warmup": b.warmup, "batches": list(b.batches), "threads": list(b.threads),
        "levels": list(b.optimizations), "images": 0, "seconds": b.seconds}
    return {"runs": dev.runs or base["runs"], "warmup": dev.warmup or base["warmup"],
            "batches": list(dev.batches or base["batches"]), "threads": list(dev.threads or base["threads"]),
            "levels": list(dev.optimizations or base["levels"]), "images": dev.images or base["images"],
            "seconds": base["seconds"]}


def run(ctx: StageContext) -> StageResult:
    from export import ort_accuracy, ort_predict, ort_session, profile_op_types

    from ..devices import DeviceError, run_on_device, write_job

    cfg, b = ctx.cfg, ctx.cfg.bench
    _, _, test = data_splits(cfg)
    test = test.subset(b.accuracy_subset, cfg.data.split_seed + seeds.BENCH_SUBSET)
    images, labels = to_float(test.images), test.labels
    arts = artifacts(ctx.inputs)
    paths = {name: str(artifact_path(ctx.inputs, name)) for name in arts}
    onnx_arts = dict(arts)
    fmt = dict.fromkeys(arts, "onnx")
    # the mobile stage's .ort files, artifacts "<name>.ort" with the model and variant of their .onnx: timed at
    # level all on every device beside the others, and held to the host's predictions like them
    for label, (model, variant, name) in ort_artifacts(ctx.inputs).items():
        arts[label], paths[label], fmt[label] = (model, variant), str(ctx.inputs["mobile"][ort_key(name)]), "ort"

    accuracy = {}
    for name, source in DETERMINISTIC.items():
        model = load_model(ctx.inputs[source]["model_weights"], ctx.inputs[source]["model_arch"])
        torch_acc = evaluate(model, test, batch_size=256, device="cpu", noise=False)
        ort_acc = ort_accuracy(ort_session(paths[name], intra_op_threads=1), images, labels)
        accuracy[name] = {"images": len(test), "torch_noise_off": torch_acc, "onnxruntime": ort_acc,
                          "difference_pt": ort_acc - torch_acc}
        ctx.log(f"{name}: accuracy torch(noise off) {torch_acc:.2f}% vs onnxruntime {ort_acc:.2f}% "
                f"on {len(test)} test images")
    # the host's predictions: what every device must reproduce (same session settings as device_bench.py)
    reference = {name: ort_predict(ort_session(paths[name], intra_op_threads=1), images, batch_size=50).argmax(1)
                 for name, (_, variant) in arts.items() if variant in AGREEMENT_VARIANTS}

    x = images.numpy()
    y = labels.numpy()
    devices, rows = {}, []
    jobs = ctx.out_dir / "jobs"
    for dev in b.devices:
        dname, kind = device_name(dev), kind_of(dev.target)
        plan = device_plan(dev, b)
        n = plan["images"] or len(x)
        settings = [{"batch": bs, "threads": t} for bs in plan["batches"] for t in thread_counts(plan["threads"])]
        levels = {name: plan["levels"] if (kind == "host" and name in DETERMINISTIC) else
                  ["all" if "all" in plan["levels"] else plan["levels"][-1]] for name in arts}
        job_dir = jobs / re.sub(r"[^A-Za-z0-9_.-]+", "_", dname)
        write_job(job_dir, {k: paths[k] for k in arts}, x[:n], settings=settings, levels=levels,
                  warmup=plan["warmup"], runs=plan["runs"], seed=cfg.seed, seconds=plan["seconds"])
        ctx.log(f"device {dname}: {len(arts)} artifacts, {len(settings)} setting(s), {plan['runs']} runs each, "
                f"{n} images")
        try:
            result = run_on_device(dev, job_dir, timeout_s=dev.timeout_s)
        except DeviceError as err:
            ctx.log(f"device {dname}: FAILED: {err}")
            devices[dname] = {"target": dev.target, "kind": kind, "error": str(err)}
            continue
        finally:
            shutil.rmtree(job_dir, ignore_errors=True)
        rt = result["runtime"]
        emulated = bool(rt.get("emulated"))
        per_art = {}
        for name, (model, variant) in arts.items():
            got = result["models"][name]
            pred = np.asarray(got["logits"]).argmax(1)
            entry = {"model": model, "variant": variant, "format": fmt[name], "bytes": got["bytes"], "images": n,
                     "accuracy": 100.0 * float((pred == y[:n]).mean())}
            if name in reference:
                entry["agreement_with_host"] = 100.0 * float((pred == reference[name][:n]).mean())
            per_art[name] = entry
        devices[dname] = {"target": dev.target, "kind": kind, "emulated": emulated, "runtime": rt,
                          "qemu_cpu": dev.qemu_cpu if kind == "aarch64-emu" else None, "artifacts": per_art}
        for r in result["latency"]:
            model, variant = arts[r["model"]]
            rows.append({"device": dname, "emulated": emulated, "runtime": f"onnxruntime {rt['onnxruntime']}",
                         "provider": rt["provider"], "cpu": rt["cpu"], "arch": rt["machine"], "cores": rt["cores"],
                         "artifact": r["model"], "model": model, "variant": variant, "format": fmt[r["model"]],
                         **{k: r[k] for k in ("graph_optimization", "threads", "batch", "p50_ms", "p90_ms",
                                              "p99_ms", "mean_ms", "runs")}})
        agree = {k: v["agreement_with_host"] for k, v in per_art.items() if "agreement_with_host" in v}
        ctx.log(f"device {dname}: onnxruntime {rt['onnxruntime']} on {rt['machine']} ({rt['cpu']})"
                f"{' EMULATED' if emulated else ''}; agreement with host: "
                + ", ".join(f"{k} {v:.1f}%" for k, v in agree.items()))

    metrics = {"accuracy": accuracy, "devices": devices, "latency_all": rows,
               "noise_overhead": noise_overhead(rows), "int8": int8_change(rows, devices)}
    host = next((d for d in b.devices if kind_of(d.target) == "host" and device_name(d) in devices
                 and "error" not in devices[device_name(d)]), None)
    if host is not None:
        metrics.update(host_headline(rows, device_name(host), ctx.log))
        batch, threads = (1, 1) if (1, 1) in {(r["batch"], r["threads"]) for r in rows} else \
            (rows[0]["batch"], rows[0]["threads"])
        profile = {}
        for name in onnx_arts:   # a .ort file runs its .onnx's kernels, optimised ahead of time
            best = metrics["best_level"].get(name, "all")
            profile[name] = {"graph_optimization": best, "batch": batch, "threads": threads,
                             "ops": profile_op_types(paths[name], optimization=best, threads=threads, batch=batch,
                                                     runs=min(b.runs, 100), seed=cfg.seed)}
        metrics["profile"] = profile
    write_json(ctx.out_dir / "bench.json", metrics)
    failed = [f"{name}: {d['error']}" for name, d in devices.items() if "error" in d]
    return StageResult({"bench": ctx.out_dir / "bench.json"}, metrics,
                       incomplete=f"{len(failed)} device(s) failed; first: {failed[0]}" if failed else None)


def host_headline(rows: list[dict], host: str, log) -> dict:
    """The host's dense/pruned deterministic rows (every level), the best level per setting, and the speed-up."""
    latency = {name: [dict(r) for r in rows if r["device"] == host and r["artifact"] == name]
               for name in DETERMINISTIC}
    best = {name: best_rows(rs) for name, rs in latency.items()}
    speedup = []
    for setting, dense in best["dense"].items():
        pruned = best["pruned"][setting]
        dense["best"] = pruned["best"] = True
        speedup.append({"batch": setting[0], "threads": setting[1],
                        "dense_level": dense["graph_optimization"], "dense_p50_ms": dense["p50_ms"],
                        "pruned_level": pruned["graph_optimization"], "pruned_p50_ms": pruned["p50_ms"],
                        "speedup": dense["p50_ms"] / pruned["p50_ms"]})
        log(f"batch {setting[0]}, {setting[1]} thread(s): dense-best {dense['p50_ms']:.3f} ms "
            f"({dense['graph_optimization']}), pruned-best {pruned['p50_ms']:.3f} ms "
            f"({pruned['graph_optimization']}): x{speedup[-1]['speedup']:.2f} on {dense['cpu']}")
    for rs in latency.values():
        for r in rs:
            r.setdefault("best", False)
    first = next(iter(best["dense"]))
    headline = (1, 1) if (1, 1) in best["dense"] else first
    best_level = {name: best[name][headline]["graph_optimization"] for name in DETERMINISTIC}
    return {"latency": latency, "speedup": speedup, "best_level": best_level}


def _p50(rows, **match) -> dict[tuple, float]:
    out = {}
    for r in rows:
        if all(r[k] == v for k, v in match.items()) and r["graph_optimization"] == "all" \
                and r.get("format", "onnx") == "onnx":   # .ort rows share model and variant with their .onnx
            out[(r["device"], r["model"], r["batch"], r["threads"])] = r["p50_ms"]
    return out


def noise_overhead(rows: list[dict]) -> list[dict]:
    """Per device, model and setting (level ``all``): the noisy variants' p50 next to the deterministic one, and
    the noise's share of the noisy latency, (noisy - deterministic) / noisy."""
    det = _p50(rows, variant="deterministic")
    out = []
    for variant in ("stochastic", "per_sample"):
        for key, p50 in _p50(rows, variant=variant).items():
            if key in det:
                dev, model, batch, threads = key
                emulated = next(r["emulated"] for r in rows if r["device"] == dev)
                out.append({"device": dev, "emulated": emulated, "model": model, "variant": variant,
                            "batch": batch, "threads": threads, "deterministic_p50_ms": det[key],
                            "noisy_p50_ms": p50, "noise_share": (p50 - det[key]) / p50})
    return out


def int8_change(rows: list[dict], devices: dict) -> list[dict]:
    """Per device, model and setting (level ``all``): int8 vs its float graph in latency, size and accuracy."""
    f32, i8 = _p50(rows, variant="deterministic"), _p50(rows, variant="int8")
    out = []
    for key, p50 in i8.items():
        if key not in f32:
            continue
        dev, model, batch, threads = key
        arts = devices[dev]["artifacts"]
        out.append({"device": dev, "emulated": devices[dev]["emulated"], "model": model, "batch": batch,
                    "threads": threads, "float_p50_ms": f32[key], "int8_p50_ms": p50,
                    "latency_ratio": p50 / f32[key],
                    "size_ratio": arts[f"{model}_int8"]["bytes"] / arts[model]["bytes"],
                    "accuracy_change_pt": arts[f"{model}_int8"]["accuracy"] - arts[model]["accuracy"]})
    return out


STAGE = Stage("bench", sections=("seed", "data", "bench"),
              inputs=("train", "finetune", "export", "quantize", "mobile"),
              run=run, tables=(DEVICE_KINDS,))
