"""The run's report: report.json (``build.py``), report.md (``markdown.py``), PNG plots (``plots.py``); the sweep
table (``sweep.py``). Reads the manifest and the catalog tables; writes only the report files of a run folder."""
from __future__ import annotations

from pathlib import Path

from ..core.files import atomic_write_bytes, atomic_write_text, write_json
from .build import build_report
from .markdown import render_markdown
from .plots import render_plots


def write_report(run_dir: Path, manifest: dict) -> dict:
    """report.json, report.md and the plots of ``run_dir``; with the thin baseline of ``pipeline baseline``
    (``run_dir/baseline/report.json``) beside the pruned model when there is one."""
    import json

    thin = run_dir / "baseline" / "report.json"
    report = build_report(manifest, json.loads(thin.read_text()) if thin.is_file() else None)
    for name, data in render_plots(report).items():
        atomic_write_bytes(run_dir / name, data)
    write_json(run_dir / "report.json", report)
    atomic_write_text(run_dir / "report.md", render_markdown(report))
    return report
