"""One markdown table of the quantized robustness rows (report.json ``quantized``) of several runs, with each
run's pruned-model sparsity and the host latency of every artifact (batch 1, 1 thread, best level) -- the README's
"Quantized and still robust (measured)" tables.

    python benchmarks/quant_table.py runs/q-deploy-qat runs/q-quick-br4 ... [--models pruned]"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def best_p50(report: dict, artifact: str) -> float | None:
    rows = [r["p50_ms"] for r in report.get("latency", []) if r["artifact"] == artifact and r["batch"] == 1
            and r["threads"] == 1 and not r.get("emulated") and r["device"] == "host"]
    return min(rows) if rows else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--models", nargs="*", default=["dense", "pruned"])
    args = ap.parse_args(argv)
    lines = ["| run | artifact | method | bits | kB | host p50 b1/t1 (ms) | channel sp. (%) | weight zeros (%) | "
             "natural | PGD | worst case | transfer worst |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in args.runs:
        report = json.loads((Path(run) / "report.json").read_text())
        sparsity = {m["variant"]: m for m in report["models"]}
        for r in report.get("quantized", []):
            if r["model"] not in args.models:
                continue
            sp = sparsity.get(r["model"], {})
            zeros = r["grid_sparsity"] if r["grid_sparsity"] is not None else sp.get("weight_sparsity")
            p50 = best_p50(report, r["artifact"])
            f = lambda v, spec=".2f": "–" if v is None else format(v, spec)  # noqa: E731
            lines.append(f"| {Path(run).name} | {r['artifact']} | {r['method']} | {r['bits']} | "
                         f"{f(r['bytes'] and r['bytes'] / 1e3, '.0f')} | {f(p50, '.3f')} | "
                         f"{f(sp.get('channel_sparsity'), '.1f')} | {f(zeros, '.1f')} | {f(r['natural'])} | "
                         f"{f(r['attacks'].get('pgd'))} | {f(r['worst_case'])} | {f(r['transfer_worst'])} |")
        bad = report.get("sanity_failures", 0)
        lines.append(f"| {Path(run).name} | sanity failures: {bad} | | | | | | | | | | |") if bad else None
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
