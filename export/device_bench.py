"""Self-contained onnxruntime benchmark that runs *on the device*: host, emulated aarch64 root, or a remote board.

Only the standard library, numpy and onnxruntime are imported, so the file can be copied next to the artifacts and
run by whatever python the device has:  ``python device_bench.py JOB.json RESULT.json``.

JOB.json (paths relative to the job file's folder)::

    {"models": {"dense": "dense.onnx", ...},            # name -> ONNX file
     "inputs": "inputs.npy",                             # float32 [K,3,32,32] images in [0,1] for predictions
                                                         # (absent or null: no predictions, timing only)
     "shapes": {"unit": [16, 32, 32]},                   # optional: a model's input shape without the batch
     "predict_batch": 50,
     "settings": [{"batch": 1, "threads": 1}, ...],      # timed settings; threads 0 = all cores
     "levels": ["all"],                                  # levels timed, or {model: [levels]} per model
     "warmup": 10, "runs": 50, "seed": 0,
     "seconds": 0,                                       # > 0: a setting's rounds stop after this long (>= MIN_RUNS)
     "interleave": true}                                 # false: each model's runs back to back (steady state)

RESULT.json: ``runtime`` (onnxruntime version, provider, machine, CPU model, emulation flag), per-model ``logits``
on the inputs (level ``all``, one thread, batch ``predict_batch``) and file size, and ``latency`` rows with
p50/p90/p99/mean per (model, level, batch, threads). All (model, level) pairs of one setting are timed
interleaved in this one process, so slow drift hits every artifact alike -- in turns of BLOCK runs each, after
BLOCK_WARM untimed ones: a device runs one model again and again, so each timed run finds that model's weights in
the caches, as in deployment (single runs alternating between a dozen graphs would time every one cold, which
penalises small graphs most). A latency table (``interleave: false``) times each graph back to back: the same
warm regime.
"""
import json
import os
import platform
import sys
import time

import numpy as np

MIN_RUNS = 30   # with a time bound, never fewer runs than this (p90 from >= 30 samples; p99 ~ their largest)
BLOCK, BLOCK_WARM = 10, 2   # timed runs per turn of one graph, and the untimed runs that warm it first
LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "all": "ORT_ENABLE_ALL"}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return platform.processor() or "unknown"
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip().lower()
        if key in ("model name", "hardware", "cpu model"):
            return line.split(":", 1)[1].strip()
    # aarch64 kernels list implementer/part numbers instead of a name
    part = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.lower().startswith("cpu part")]
    impl = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.lower().startswith("cpu implementer")]
    if part:
        return f"implementer {impl[0] if impl else '?'} part {part[0]}"
    return platform.processor() or "unknown"


def session(ort, path, threads, level):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    # spinning workers would steal the cores of the interleaved competitor
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def percentiles(times_ns):
    ms = np.asarray(times_ns, dtype=np.float64) / 1e6
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(ms.mean()),
            "runs": int(len(ms))}


def main(job_path, result_path):
    import onnxruntime as ort

    base = os.path.dirname(os.path.abspath(job_path))
    with open(job_path) as f:
        job = json.load(f)
    models = {name: os.path.join(base, p) for name, p in job["models"].items()}
    inputs = np.load(os.path.join(base, job["inputs"])).astype(np.float32) if job.get("inputs") else None
    shapes = {name: tuple(job.get("shapes", {}).get(name) or inputs.shape[1:]) for name in models}
    cores = os.cpu_count() or 1
    result = {
        "runtime": {"onnxruntime": ort.__version__, "provider": "CPUExecutionProvider",
                    "providers_available": list(ort.get_available_providers()),
                    "python": platform.python_version(), "machine": platform.machine(), "cpu": cpu_model(),
                    "cores": cores, "qemu_cpu": os.environ.get("QEMU_CPU") or None,
                    "emulated": bool(os.environ.get("PIPELINE_EMULATED"))},
        "models": {}, "latency": []}

    batch = int(job.get("predict_batch", 50))
    for name, path in models.items():
        result["models"][name] = {"bytes": os.path.getsize(path)}
        if inputs is None:
            continue
        t0 = time.perf_counter()
        s = session(ort, path, 1, "all")
        load_s = time.perf_counter() - t0
        feed = s.get_inputs()[0].name
        logits = np.concatenate([s.run(None, {feed: inputs[i:i + batch]})[0] for i in range(0, len(inputs), batch)])
        result["models"][name].update(session_s=load_s, logits=logits.astype(np.float64).round(6).tolist())

    rng = np.random.default_rng(int(job.get("seed", 0)))
    warmup, runs = int(job["warmup"]), int(job["runs"])
    seconds = float(job.get("seconds") or 0)
    for setting in job["settings"]:
        b, threads = int(setting["batch"]), int(setting["threads"]) or cores
        xs = {shape: rng.random((b, *shape), dtype=np.float32) for shape in dict.fromkeys(shapes.values())}
        levels = job["levels"]
        pairs = [(name, level) for name in models
                 for level in (levels[name] if isinstance(levels, dict) else levels)]
        sess = {p: session(ort, models[p[0]], threads, p[1]) for p in pairs}
        feeds = {p: {s.get_inputs()[0].name: xs[shapes[p[0]]]} for p, s in sess.items()}
        for p, s in sess.items():
            for _ in range(warmup):
                s.run(None, feeds[p])
        times = {p: [] for p in pairs}
        if job.get("interleave", True):
            t_start, turn = time.perf_counter(), 0
            while min(len(t) for t in times.values()) < runs:
                if seconds and min(len(t) for t in times.values()) >= MIN_RUNS and \
                        time.perf_counter() - t_start > seconds:
                    break
                # alternate the order of the turns: cancels drift and first-in-round effects
                for p in (pairs if turn % 2 == 0 else pairs[::-1]):
                    for _ in range(BLOCK_WARM):
                        sess[p].run(None, feeds[p])
                    for _ in range(min(BLOCK, runs - len(times[p]))):
                        t0 = time.perf_counter_ns()
                        sess[p].run(None, feeds[p])
                        times[p].append(time.perf_counter_ns() - t0)
                turn += 1
        else:   # many small graphs (a latency table): each one warm, as it runs inside a deployed network
            for p in pairs:
                for _ in range(warmup):
                    sess[p].run(None, feeds[p])
                for _ in range(runs):
                    t0 = time.perf_counter_ns()
                    sess[p].run(None, feeds[p])
                    times[p].append(time.perf_counter_ns() - t0)
        for (name, level), ts in times.items():
            result["latency"].append({"model": name, "graph_optimization": level, "batch": b, "threads": threads,
                                      **percentiles(ts)})
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, result_path)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python device_bench.py JOB.json RESULT.json")
    main(sys.argv[1], sys.argv[2])
