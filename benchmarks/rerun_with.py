"""Rerun a finished run's recorded config with overrides, into a copy of the run folder: the stages the overrides do
not touch are reused (with --reuse-stale: also across code changes that leave them valid), the others run.

    python benchmarks/rerun_with.py SRC_RUN DST_RUN [--reuse-stale] key=value ...

Used for the README's measured quantization rows: QAT / Binary-Relax on top of an existing trained + pruned run."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def main(argv=None) -> int:
    from pipeline.config import load_config
    from pipeline.report import write_report
    from pipeline.run.runner import run_pipeline
    from pipeline.stages import STAGES

    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--reuse-stale", action="store_true")
    ap.add_argument("sets", nargs="*")
    args = ap.parse_intermixed_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    if not dst.exists():
        shutil.copytree(src, dst, symlinks=True)
    data = json.loads((dst / "manifest.json").read_text())["config"]
    cfg = load_config(None, args.sets, data=data, source=f"{dst / 'manifest.json'} config")
    manifest = run_pipeline(cfg, dst, STAGES, log=lambda m: print(m, flush=True), reuse_stale=args.reuse_stale)
    write_report(dst, manifest)
    print(f"report: {dst / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
