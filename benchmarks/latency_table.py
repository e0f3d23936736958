"""How well the latency table predicts a whole pruned graph on this host (issue 18's latency model).

Builds the table of a config's budget device (the latency stage's code, cache included), then for the dense
network and for layouts the budget solver picks at several targets (random group norms: the layout, not the
weights, decides the latency) builds the physically pruned network (zeroed groups + surgery, branches removed),
exports it as the export stage does (dynamo exporter, onnxsim) and times all of them interleaved in one
device_bench process, at the table's setting (level all, batch 1, one thread). Prints predicted vs measured.

    python benchmarks/latency_table.py [--config configs/deploy_host.toml] [--targets 1.25,1.5,2,3] [--runs 300]
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export import export_onnx  # noqa: E402
from models import create_model  # noqa: E402
from pipeline.algorithms.budget import group_loss, solve  # noqa: E402
from pipeline.algorithms.groups import coupled_families  # noqa: E402
from pipeline.algorithms.latency import latency_problem, network_units  # noqa: E402
from pipeline.algorithms.rgsm import top_k_mask  # noqa: E402
from pipeline.algorithms.surgery import remove_dead_channels  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.devices import run_on_device, write_job  # noqa: E402
from pipeline.devices.hardware import resolve_align  # noqa: E402
from pipeline.stages.latency import BATCH, LEVEL, THREADS, budget_device_of, latency_table  # noqa: E402
from pipeline.train.setup import model_kwargs  # noqa: E402
from pipeline.train.sparsify import allowed_widths  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/deploy_host.toml")
    ap.add_argument("--targets", default="1.25,1.5,2,3")
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = load_config(args.config, ["prune.budget=latency", "prune.groups=coupled"])
    table = latency_table(cfg)
    torch.manual_seed(args.seed)
    model = create_model(cfg.model.arch, **model_kwargs(cfg)).eval()
    example = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed))
    families = coupled_families(model, example)
    options = allowed_widths(model, families, resolve_align(cfg.prune.align))
    problem = latency_problem(network_units(model, families), options, table["units"], table["offset_ms"])
    dense = problem.cost(problem.dense_choice())
    layouts = {"dense": problem.dense_choice()}
    for t in (float(x) for x in args.targets.split(",")):
        losses = [group_loss(f.sq_norms().numpy(), o, 1.0) for f, o in zip(families, options)]
        layouts[f"target {t:g}"] = solve(problem, losses, dense / t)
    with tempfile.TemporaryDirectory(prefix="latency-table-") as tmp:
        tmp = Path(tmp)
        paths = {}
        for i, (name, choice) in enumerate(layouts.items()):
            pruned = copy.deepcopy(model)
            fams = coupled_families(pruned, example)
            with torch.no_grad():
                for fam, o, c in zip(fams, options, choice):
                    keep = top_k_mask(fam.sq_norms(), o[c])
                    for s in fam.slices:
                        s.tensor.mul_(s.along_dim(keep, fill=1.0))
            net = remove_dead_channels(pruned, example).model if name != "dense" else pruned
            paths[f"m{i}"] = tmp / f"m{i}.onnx"
            export_onnx(net, paths[f"m{i}"], opset=cfg.export.opset, dynamo=cfg.export.dynamo,
                        simplify=cfg.export.simplify)
        write_job(tmp / "job", paths, None, settings=[{"batch": BATCH, "threads": THREADS}], levels=[LEVEL],
                  warmup=50, runs=args.runs, seed=args.seed, shapes={k: (3, 32, 32) for k in paths})
        dev = budget_device_of(cfg)
        result = run_on_device(dev, tmp / "job", timeout_s=dev.timeout_s)
    measured = {r["model"]: r["p50_ms"] for r in result["latency"]}
    rt = result["runtime"]
    print(f"{cfg.model.arch} x{cfg.model.ensemble}, {rt['cpu']}, onnxruntime {rt['onnxruntime']}, level {LEVEL}, "
          f"batch {BATCH}, {THREADS} thread; table: {len(table['units'])} units, offset {table['offset_ms']:.3f} ms")
    print(f"{'layout':<14} {'predicted ms':>12} {'measured ms':>12} {'error':>8} {'pred. speed-up':>15} "
          f"{'meas. speed-up':>15}")
    errors = []
    for i, (name, choice) in enumerate(layouts.items()):
        pred, meas = problem.cost(choice), measured[f"m{i}"]
        errors.append(abs(pred - meas) / meas)
        print(f"{name:<14} {pred:>12.4f} {meas:>12.4f} {100 * (pred - meas) / meas:>+7.1f}% "
              f"{dense / pred:>15.2f} {measured['m0'] / meas:>15.2f}")
    print(f"largest |error|: {100 * max(errors):.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
