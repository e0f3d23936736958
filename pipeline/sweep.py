"""``pipeline sweep --config C --grid prune.lambda1=0.01,0.02 [--grid ...]``: one run folder per grid point.

Points run in turn. Before a stage runs, the earlier points are searched for the same stage finished with
the same key (config sections + inputs + code); a match is hard-linked in instead of recomputed -- e.g. one
train stage serves a whole lambda1 sweep, since the train stage's key has no [prune] section. A point that
fails is recorded with its error and the sweep goes on; the exit status says whether any failed.
Every point's config is validated before anything runs, so a typo fails in a second, not after hours.
"""
from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path

from .config import ConfigError, RunConfig, _parse_override, load_config
from .runio import atomic_write_bytes, atomic_write_text, write_json

PLOTS = {"accuracy": "sweep_accuracy.png", "sparsity": "sweep_sparsity.png"}


def parse_grid(texts: list[str]) -> list[tuple[str, list]]:
    """``key=v1,v2`` -> (key, [v1, v2]); each value is read as a TOML value, a bare word as a string."""
    grid, seen = [], set()
    for text in texts:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise ConfigError(f"--grid {text}: expected section.key=value1,value2,...")
        if key in seen:
            raise ConfigError(f"--grid {text}: '{key}' is given twice; list all its values in one --grid")
        seen.add(key)
        values = [_parse_override(f"{key}={v}", f"--grid {text}")[1] for v in raw.split(",")]
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"--grid {text}: repeated value")
        grid.append((key, values))
    if not grid:
        raise ConfigError("sweep: give at least one --grid section.key=value1,value2")
    return grid


def _slug(key: str, value) -> str:
    text = f"{key.rsplit('.', 1)[-1]}={value}"
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text)


def grid_points(config: str, grid: list[tuple[str, list]], overrides: list[str]) -> list[tuple[str, dict, RunConfig]]:
    """(folder name, {key: value}, validated config) per point, in grid order (last key fastest)."""
    points = []
    for combo in itertools.product(*(values for _, values in grid)):
        assignment = {key: value for (key, _), value in zip(grid, combo)}
        sets = list(overrides) + [f"{k}={_toml(v)}" for k, v in assignment.items()]
        name = "__".join(_slug(k, v) for k, v in assignment.items())
        try:
            cfg = load_config(config, sets)
        except ConfigError as e:
            # name the grid point, not --set, when the bad value came from the grid
            text = str(e)
            for key, value in assignment.items():
                if text.startswith(f"--set: {key}:") or text.startswith("--set: ") and f"'{key}'" in text:
                    raise ConfigError(f"--grid point {key}={value!r}: {text.removeprefix('--set: ')}") from None
            raise
        points.append((name, assignment, cfg))
    return points


def _toml(value) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def run_sweep(config: str, grid_texts: list[str], overrides: list[str], out: Path, *, log=print,
              reuse_stale: bool = False, share_from: tuple[Path, ...] = ()) -> dict:
    """``share_from``: more run folders (or sweep folders, meaning their points) to take finished stages from."""
    from .report import write_report
    from .runner import run_pipeline
    from .stages import STAGES

    grid = parse_grid(grid_texts)
    points = grid_points(config, grid, overrides)
    extra = []
    for d in share_from:
        d = Path(d)
        if not d.is_dir():
            raise ConfigError(f"--share-from {d}: not a folder")
        extra += sorted(p for p in (d / "points").iterdir() if p.is_dir()) if (d / "points").is_dir() else [d]
    out.mkdir(parents=True, exist_ok=True)
    results, tried = [], []
    for i, (name, assignment, cfg) in enumerate(points, start=1):
        run_dir = out / "points" / name
        log(f"[sweep] point {i}/{len(points)}: {name}")
        t0 = time.perf_counter()
        entry = {"name": name, "grid": assignment, "run_dir": str(run_dir.relative_to(out))}
        try:
            manifest = run_pipeline(cfg, run_dir, STAGES, log=log, reuse_stale=reuse_stale,
                                    donors=tuple(tried) + tuple(extra))
            report = write_report(run_dir, manifest)
            entry.update({"status": "done", **point_row(cfg, manifest, report),
                          "shared_stages": sorted(k for k, v in manifest["stages"].items() if "shared_from" in v)})
        except KeyboardInterrupt:
            raise
        except Exception as e:   # one point's failure (user error or bug) must not cost the others
            msg = str(e).splitlines()[0] if str(e) else ""
            entry.update({"status": "failed", "error": f"{type(e).__name__}: {msg}"[:300]})
            log(f"[sweep] point {name} failed: {entry['error']}")
        tried.append(run_dir)   # a failed point's finished stages (its manifest says which) serve the others too
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(entry)
        _write(out, config, grid, overrides, results)   # after every point: a killed sweep keeps its table
    return _write(out, config, grid, overrides, results)


def point_row(cfg: RunConfig, manifest: dict, report: dict) -> dict:
    """The Table-2 columns of the point's pruned model (paper mode: noise on, one pass, when it has noise)."""
    st = manifest["stages"]
    ev = st["eval"]["metrics"]
    name = "pruned" if "pruned" in ev["models"] else next(iter(ev["models"]), None)
    modes = ev["models"].get(name, {})
    res = modes.get("stochastic") or modes.get("noise_off") or {}
    if "same_as" in res:
        res = ev["models"][res["same_as"]].get("stochastic") or ev["models"][res["same_as"]].get("noise_off", {})
    acc = {a: row["accuracy"] for a, row in res.get("attacks", {}).items()}
    surgery, pruned = st["surgery"]["metrics"], report["models"][1]
    headline = report.get("headline", {})
    return {
        "net": cfg.model.arch if cfg.model.ensemble == 1 else f"En{cfg.model.ensemble} {cfg.model.arch}",
        "method": cfg.prune.method, "hyper": method_hyper(cfg),
        "evaluated": f"{name}, {'noise on, 1 pass' if 'stochastic' in modes else 'noise off'}",
        "a1": res.get("natural"), "a2": acc.get("fgsm"), "a3": acc.get("ifgsm"), "a4": acc.get("cw_paper"),
        "channel_sparsity": surgery["channel_sparsity"],
        "channel_weight_sparsity": surgery.get("channel_weight_sparsity"),
        "weight_sparsity": surgery["weight_sparsity"],
        # channels surgery really removed, over all input channels: comparable with channel_sparsity
        "removable_channels": 100.0 * surgery["removed_channels"] / surgery["total_channels"],
        "mac_reduction": surgery["macs_before"] / surgery["macs_after"],
        "speedup": headline.get("speedup"),
        "val": st["prune"]["metrics"].get("val", {}),
        "paper": report.get("paper", {}),
        "onnx": pruned["onnx"],
    }


def method_hyper(cfg: RunConfig) -> dict:
    p = cfg.prune
    if p.method == "rgsm":
        return {"beta": p.beta, "lambda1": p.lambda1, "lambda2": p.lambda2, "prox": p.rgsm_prox}
    if p.method == "rvsm":
        return {"beta": p.beta, "lambda": p.rvsm_lambda, "penalty": p.penalty,
                **({"a": p.tl1_a} if p.penalty == "tl1" else {})}
    if p.method == "admm":
        return {"sparsity": p.sparsity, "percentile": p.percentile, "rho": p.rho}
    return {}


def _write(out: Path, config: str, grid, overrides, results: list[dict]) -> dict:
    sweep = {"config": str(config), "grid": {k: v for k, v in grid}, "overrides": list(overrides),
             "points": results, "failed": sum(r["status"] != "done" for r in results), "plots": dict(PLOTS)}
    for key, data in render_sweep_plots(sweep).items():
        atomic_write_bytes(out / PLOTS[key], data)
    write_json(out / "sweep.json", sweep)
    atomic_write_text(out / "sweep.md", render_sweep_markdown(sweep))
    return sweep


def _fmt(v, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def render_sweep_markdown(sweep: dict) -> str:
    lines = [f"# Sweep of `{sweep['config']}`", "",
             "Grid: " + "; ".join(f"`{k}` = {', '.join(map(str, v))}" for k, v in sweep["grid"].items())
             + (f". Overrides: {', '.join(f'`{o}`' for o in sweep['overrides'])}" if sweep["overrides"] else "")
             + ".", "",
             "Columns in the paper's Table 2 order. A1-A4: the pruned model's test accuracy (%) with the reference "
             "script's attacks (A2 FGSM, A3 IFGSM-20, A4 its rescaled C&W), noise on and one pass when the model "
             "has noise. Ch. Sp.: input-channel groups with norm < 1e-15 (the paper's count). Sp. (ch.): weights "
             "in those channels; Sp. (exact): exactly zero conv weights. Removable: input channels surgery really "
             "removed (% of all, like Ch. Sp.). Speed-up: onnxruntime, best level of each artifact, batch 1, "
             "1 thread.", "",
             "| point | net | method | hyper-parameters | A1 | A2 | A3 | A4 | Ch. Sp. | Sp. (ch.) | Sp. (exact) | "
             "removable | MACs ÷ | speed-up | seconds |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sweep["points"]:
        if r["status"] != "done":
            lines.append(f"| {r['name']} | **failed**: {r['error']} |" + " |" * 12 + f" {r['seconds']} |")
            continue
        hyper = ", ".join(f"{k} {v}" for k, v in r["hyper"].items())
        lines.append(f"| {r['name']} | {r['net']} | {r['method']} | {hyper} | " + " | ".join(
            _fmt(r[k]) for k in ("a1", "a2", "a3", "a4", "channel_sparsity", "channel_weight_sparsity",
                                 "weight_sparsity", "removable_channels", "mac_reduction", "speedup"))
            + f" | {r['seconds']} |")
        paper = r.get("paper") or {}
        if any(k in paper for k in ("a1_natural", "channel_sparsity", "weight_sparsity")):
            lines.append(f"| ↳ paper: {paper.get('row', '')} | | | | " + " | ".join(
                _fmt(paper.get(k)) for k in ("a1_natural", "a2_fgsm", "a3_ifgsm20", "a4_cw", "channel_sparsity"))
                + f" | – | {_fmt(paper.get('weight_sparsity'))} | | | | |")
    shared = [f"{r['name']}: {', '.join(r['shared_stages'])}" for r in sweep["points"] if r.get("shared_stages")]
    if shared:
        lines += ["", "Stages shared with an earlier point (same key, hard-linked, not recomputed): "
                  + "; ".join(shared) + "."]
    if sweep["failed"]:
        lines += ["", f"**{sweep['failed']} point(s) failed**; rerun the same command to retry them (finished "
                      "stages are kept)."]
    lines += ["", f"![accuracy vs channel sparsity]({PLOTS['accuracy']})",
              f"![removable vs paper channel sparsity]({PLOTS['sparsity']})", ""]
    return "\n".join(lines)


def render_sweep_plots(sweep: dict) -> dict[str, bytes]:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in sweep["points"] if r["status"] == "done"]
    out = {}
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key, label, marker in (("a1", "A1 natural", "o"), ("a3", "A3 IFGSM-20", "s")):
        pts = [(r["channel_sparsity"], r[key]) for r in done if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*sorted(pts)), marker=marker, label=label)
    for r in done:
        if r.get("a1") is not None:
            ax.annotate(r["name"], (r["channel_sparsity"], r["a1"]), fontsize=6, alpha=0.7)
    ax.set_xlabel("channel sparsity (%, paper's count)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("sweep: accuracy vs channel sparsity")
    ax.grid(alpha=0.3)
    if done:
        ax.legend(fontsize=8)
    out["accuracy"] = _png(fig, plt, io)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    pts = [(r["channel_sparsity"], r["removable_channels"]) for r in done if r.get("removable_channels") is not None]
    if pts:
        ax.scatter(*zip(*pts), color="#2b6cb0")
        top = max(max(x, y) for x, y in pts) or 1.0
        ax.plot([0, top], [0, top], color="#999", lw=0.8, ls="--", label="removable = zero")
        ax.legend(fontsize=8)
    ax.set_xlabel("channel sparsity (%, zero input groups)")
    ax.set_ylabel("removed by surgery (%)")
    ax.set_title("removable vs paper channel sparsity")
    ax.grid(alpha=0.3)
    out["sparsity"] = _png(fig, plt, io)
    return out


def _png(fig, plt, io) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
