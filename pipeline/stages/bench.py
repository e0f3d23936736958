"""Stage ``bench``: onnxruntime on the host CPU -- accuracy next to torch on the same images, and latency of
every (artifact, graph optimisation level) pair timed interleaved in one process, per batch size and thread
count. A user runs the level that is fastest for *their* model, so the headline speed-up is dense-best ÷
pruned-best per setting, never a pruned level against a slower dense one."""
from __future__ import annotations

import os

from ..data import to_float
from ..runio import load_model, write_json
from ..runner import Stage, StageContext, StageResult
from ..training import evaluate
from .common import data_splits

VARIANTS = {"dense": "train", "pruned": "surgery"}   # artifact -> the stage whose torch model it exports


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


def run(ctx: StageContext) -> StageResult:
    import onnxruntime

    from export import (host_device_description, measure_latency_interleaved, ort_accuracy, ort_session,
                        profile_op_types)

    cfg, b = ctx.cfg, ctx.cfg.bench
    _, _, test = data_splits(cfg)
    test = test.subset(b.accuracy_subset, cfg.data.split_seed + 4)
    images, labels = to_float(test.images), test.labels
    paths = {v: str(ctx.inputs["export"][f"{v}_onnx"]) for v in VARIANTS}
    accuracy = {}
    for variant, source in VARIANTS.items():
        model = load_model(ctx.inputs[source]["model_weights"], ctx.inputs[source]["model_arch"])
        torch_acc = evaluate(model, test, batch_size=256, device="cpu", noise=False)
        ort_acc = ort_accuracy(ort_session(paths[variant], intra_op_threads=1), images, labels)
        accuracy[variant] = {"images": len(test), "torch_noise_off": torch_acc, "onnxruntime": ort_acc,
                             "difference_pt": ort_acc - torch_acc}
        ctx.log(f"{variant}: accuracy torch(noise off) {torch_acc:.2f}% vs onnxruntime {ort_acc:.2f}% "
                f"on {len(test)} test images")

    host = host_device_description()
    runtime = f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider"
    latency = {v: [] for v in VARIANTS}
    pairs = {f"{v}@{level}": (v, level) for v in VARIANTS for level in b.optimizations}
    for batch in b.batches:
        for threads in thread_counts(b.threads):
            stats = measure_latency_interleaved({name: paths[v] for name, (v, _) in pairs.items()},
                                                levels={name: level for name, (_, level) in pairs.items()},
                                                threads=threads, batch=batch, warmup=b.warmup, runs=b.runs,
                                                seed=cfg.seed)
            for name, (variant, level) in pairs.items():
                s = stats[name]
                latency[variant].append({**host, "runtime": runtime, "graph_optimization": level,
                                         "threads": threads, "batch": batch, "p50_ms": s.p50_ms,
                                         "p90_ms": s.p90_ms, "mean_ms": s.mean_ms, "runs": s.runs})
    speedup = []
    best = {v: best_rows(rows) for v, rows in latency.items()}
    for setting, dense in best["dense"].items():
        pruned = best["pruned"][setting]
        dense["best"] = pruned["best"] = True
        speedup.append({"batch": setting[0], "threads": setting[1],
                        "dense_level": dense["graph_optimization"], "dense_p50_ms": dense["p50_ms"],
                        "pruned_level": pruned["graph_optimization"], "pruned_p50_ms": pruned["p50_ms"],
                        "speedup": dense["p50_ms"] / pruned["p50_ms"]})
        ctx.log(f"batch {setting[0]}, {setting[1]} thread(s): dense-best {dense['p50_ms']:.3f} ms "
                f"({dense['graph_optimization']}), pruned-best {pruned['p50_ms']:.3f} ms "
                f"({pruned['graph_optimization']}): x{speedup[-1]['speedup']:.2f} on {host['cpu']}")
    for rows in latency.values():
        for r in rows:
            r.setdefault("best", False)
    # Where the time goes, per op type of the graph that really runs (each artifact at its best level), at the
    # report's headline setting: batch 1 / 1 thread when timed, else the first one.
    batch, threads = (1, 1) if (1, 1) in best["dense"] else next(iter(best["dense"]))
    profile = {}
    for variant in VARIANTS:
        level = best[variant][(batch, threads)]["graph_optimization"]
        profile[variant] = {"graph_optimization": level, "batch": batch, "threads": threads,
                            "ops": profile_op_types(paths[variant], optimization=level, threads=threads, batch=batch,
                                                    runs=b.runs, seed=cfg.seed)}
    metrics = {"accuracy": accuracy, "latency": latency, "speedup": speedup, "profile": profile}
    write_json(ctx.out_dir / "bench.json", metrics)
    return StageResult({"bench": ctx.out_dir / "bench.json"}, metrics)


STAGE = Stage("bench", sections=("seed", "data", "bench"), inputs=("train", "surgery", "export"), run=run)
