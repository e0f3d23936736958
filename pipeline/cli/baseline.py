"""``pipeline baseline --run DIR``: the honest baseline for a pruned run (Liu et al., "Rethinking the Value of Network
Pruning", 2019) -- the network with the pruned run's final widths, trained from scratch for the same total number
of epochs (train + prune + finetune), then evaluated, exported and benched exactly like the pruned model.

It is a run of its own in ``DIR/baseline`` (the run's recorded config, with ``model.widths`` from the pruned model,
``train.epochs`` the total, no pruning, no fine-tuning); the run's report then shows it beside the pruned model."""
from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import UserError

FOLDER = "baseline"


def baseline_data(manifest: dict, run_dir: Path) -> tuple[dict, int]:
    """The baseline's config (as data) from the pruned run's manifest, and its total epochs."""
    from ..run.manifest import outputs_valid

    entry = manifest.get("stages", {}).get("finetune", {})
    if entry.get("status") != "done" or not outputs_valid(run_dir, entry):
        raise UserError(f"--run {run_dir}: no finished pruned model (stage finetune not done or its files changed); "
                        "finish the run with 'pipeline run' first")
    description = json.loads((run_dir / entry["outputs"]["model_arch"]["path"]).read_text())
    data = json.loads(json.dumps(manifest["config"]))
    pruned = data["prune"]["method"] != "none"
    epochs = data["train"]["epochs"] + (data["prune"]["epochs"] if pruned else 0) + data["finetune"]["epochs"]
    data["name"] = f"{data['name']}-thin"
    data["model"].update(widths={k: (v or []) for k, v in description["shapes"].items()}, ensemble_impl="members")
    data["train"]["epochs"] = epochs
    data["prune"].update(method="none", budget="none", groups="paper", align=1)
    data["finetune"]["epochs"] = 0
    return data, epochs


def run_baseline(run_dir: Path, overrides: list[str], *, log=print, reuse_stale: bool = False,
                 stages: list | None = None) -> dict | None:
    """Train and bench the thin network into ``run_dir/baseline``; rewrite ``run_dir``'s report with it.
    ``stages``: only these (then no report is written and None is returned)."""
    from ..config import load_config
    from ..report import write_report
    from ..run.manifest import load_manifest
    from ..run.runner import run_dir_lock, run_pipeline
    from ..stages import STAGES

    manifest = load_manifest(run_dir) if run_dir.is_dir() else {}
    if not manifest.get("config"):
        raise UserError(f"--run {run_dir}: no finished run here (no manifest.json with a config); "
                        "run 'pipeline run --config ...' first")
    data, epochs = baseline_data(manifest, run_dir)
    cfg = load_config(None, overrides, data=data, source=f"{run_dir / 'manifest.json'} config")
    if not cfg.model.widths:
        log("the pruned model has the dense widths: its baseline is the dense model itself")
    log(f"thin network from scratch: {len(cfg.model.widths)} resized layers, {epochs} epochs (train + prune + "
        f"finetune of {run_dir}) -> {run_dir / FOLDER}")
    with run_dir_lock(run_dir):   # the pruned run's folder: its report is rewritten at the end
        out = run_pipeline(cfg, run_dir / FOLDER, stages or STAGES, log=log, reuse_stale=reuse_stale)
        if stages and stages[-1] is not STAGES[-1]:
            return None
        write_report(run_dir / FOLDER, out)
        return write_report(run_dir, load_manifest(run_dir))
