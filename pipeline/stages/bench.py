"""Stage ``bench``: onnxruntime on the host CPU — accuracy next to torch on the same images, and
batch latency with the dense and pruned graphs timed interleaved in one process."""
from __future__ import annotations

from ..data import to_float
from ..runio import load_model, write_json
from ..runner import Stage, StageContext, StageResult
from ..training import evaluate
from .common import data_splits


def run(ctx: StageContext) -> StageResult:
    import onnxruntime

    from export import host_device_description, measure_latency_interleaved, ort_accuracy, ort_session

    cfg, b = ctx.cfg, ctx.cfg.bench
    _, _, test = data_splits(cfg)
    test = test.subset(b.accuracy_subset, cfg.data.split_seed + 4)
    images, labels = to_float(test.images), test.labels
    paths = {"dense": ctx.inputs["export"]["dense_onnx"], "pruned": ctx.inputs["export"]["pruned_onnx"]}
    sources = {"dense": "train", "pruned": "surgery"}
    accuracy = {}
    for variant, path in paths.items():
        model = load_model(ctx.inputs[sources[variant]]["model_weights"], ctx.inputs[sources[variant]]["model_arch"])
        torch_acc = evaluate(model, test, batch_size=cfg.eval.batch_size, device="cpu", noise=False)
        ort_acc = ort_accuracy(ort_session(path, intra_op_threads=b.threads), images, labels)
        accuracy[variant] = {"images": len(test), "torch_noise_off": torch_acc, "onnxruntime": ort_acc,
                             "difference_pt": ort_acc - torch_acc}
        ctx.log(f"{variant}: accuracy torch(noise off) {torch_acc:.2f}% vs onnxruntime {ort_acc:.2f}% "
                f"on {len(test)} test images")
    host = host_device_description()
    runtime = f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider"
    latency = {variant: [] for variant in paths}
    speedup = {}
    for level in b.optimizations:
        stats = measure_latency_interleaved({k: str(v) for k, v in paths.items()}, threads=b.threads, batch=b.batch,
                                            warmup=b.warmup, runs=b.runs, seed=cfg.seed, optimization=level)
        for variant, s in stats.items():
            latency[variant].append({**host, "runtime": runtime, "graph_optimization": level, "threads": s.threads,
                                     "batch": s.batch, "p50_ms": s.p50_ms, "p90_ms": s.p90_ms,
                                     "mean_ms": s.mean_ms, "runs": s.runs})
        speedup[level] = stats["dense"].p50_ms / stats["pruned"].p50_ms
        ctx.log(f"latency p50 ({level}) dense {stats['dense'].p50_ms:.3f} ms, pruned {stats['pruned'].p50_ms:.3f} ms "
                f"(x{speedup[level]:.2f}), batch {b.batch}, {b.threads} thread(s), {host['cpu']}")
    metrics = {"accuracy": accuracy, "latency": latency, "speedup_p50": speedup}
    write_json(ctx.out_dir / "bench.json", metrics)
    return StageResult({"bench": ctx.out_dir / "bench.json"}, metrics)


STAGE = Stage("bench", sections=("seed", "data", "eval", "bench"), inputs=("train", "surgery", "export"), run=run)
