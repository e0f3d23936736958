"""``pipeline sweep --config C --grid prune.lambda1=0.01,0.02 [--grid ...]``: one run folder per grid point.

Points run in turn. Before a stage runs, the earlier points are searched for the same stage finished with
the same key (config sections + inputs + code); a match is hard-linked in instead of recomputed -- e.g. one
train stage serves a whole lambda1 sweep, since the train stage's key has no [prune] section. A point that
fails is recorded with its error and the sweep goes on; the exit status says whether any failed.
Every point's config is validated before anything runs, so a typo fails in a second, not after hours.
"""
from __future__ import annotations

import itertools
import re
import time
from pathlib import Path

from ..config import ConfigError, RunConfig, load_config, parse_override, toml_value
from ..core.files import atomic_write_bytes, atomic_write_text, write_json


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
        values = [parse_override(f"{key}={v}", f"--grid {text}")[1] for v in _split_values(raw, text)]
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"--grid {text}: repeated value")
        grid.append((key, values))
    if not grid:
        raise ConfigError("sweep: give at least one --grid section.key=value1,value2")
    return grid


def _split_values(raw: str, text: str) -> list[str]:
    """``1,2`` -> [1, 2]; commas inside brackets, braces or quotes belong to the value (``[1,2],[1]`` is two
    lists)."""
    values, depth, quote, start = [], 0, "", 0
    for i, c in enumerate(raw):
        if quote:
            quote = "" if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        elif c == "," and depth == 0:
            values.append(raw[start:i])
            start = i + 1
    values.append(raw[start:])
    if depth or quote or any(not v.strip() for v in values):
        raise ConfigError(f"--grid {text}: expected section.key=value1,value2,... (an empty value, or an unclosed "
                          "bracket or quote)")
    return values


def _slug(key: str, value) -> str:
    text = f"{key.rsplit('.', 1)[-1]}={value}"
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text)


def grid_points(config: str, grid: list[tuple[str, list]], overrides: list[str]) -> list[tuple[str, dict, RunConfig]]:
    """(folder name, {key: value}, validated config) per point, in grid order (last key fastest)."""
    points = []
    for combo in itertools.product(*(values for _, values in grid)):
        assignment = {key: value for (key, _), value in zip(grid, combo)}
        # a bad value is blamed on its grid point, not on --set
        sets = list(overrides) + [(f"--grid point {k}={v!r}", f"{k}={toml_value(v)}") for k, v in assignment.items()]
        name = "__".join(_slug(k, v) for k, v in assignment.items())
        cfg = load_config(config, sets)
        for other_name, other, other_cfg in points:
            if other_cfg == cfg:
                same = ", ".join(f"{k}={other[k]!r} and {v!r}" for k, v in assignment.items() if repr(other[k]) != repr(v))
                raise ConfigError(f"--grid: {same} are the same value: points {other_name} and {name} would be "
                                  "the same run; give each value once")
        points.append((name, assignment, cfg))
    return points


def run_sweep(config: str, grid_texts: list[str], overrides: list[str], out: Path, *, log=print,
              reuse_stale: bool = False, share_from: tuple[Path, ...] = (), baseline: bool = False,
              stages: list | None = None) -> dict:
    """``share_from``: more run folders (or sweep folders, meaning their points) to take finished stages from.
    ``baseline``: after each point, ``pipeline baseline`` of it (its widths trained from scratch, benched beside).
    ``stages``: only these, for every point and baseline (no reports, no table rows)."""
    from .baseline import run_baseline
    from ..report import write_report
    from ..report.sweep import point_row
    from ..run.runner import run_pipeline
    from ..stages import STAGES

    grid = parse_grid(grid_texts)
    points = grid_points(config, grid, overrides)
    extra = []
    for d in share_from:
        d = Path(d)
        if not d.is_dir():
            raise ConfigError(f"--share-from {d}: not a folder")
        extra += sorted(p for p in (d / "points").iterdir() if p.is_dir()) if (d / "points").is_dir() else [d]
    if out.is_dir() and not (out / "sweep.json").exists() and not (out / "points").is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: not empty and not a sweep folder (no sweep.json or points/); the pipeline "
                          "writes only into a new or empty folder or one of its own sweeps: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    results, tried = [], []
    partial = stages is not None and stages[-1] is not STAGES[-1]
    for i, (name, assignment, cfg) in enumerate(points, start=1):
        run_dir = out / "points" / name
        log(f"[sweep] point {i}/{len(points)}: {name}")
        t0 = time.perf_counter()
        entry = {"name": name, "grid": assignment, "run_dir": str(run_dir.relative_to(out))}
        try:
            manifest = run_pipeline(cfg, run_dir, stages or STAGES, log=log, reuse_stale=reuse_stale,
                                    donors=tuple(tried) + tuple(extra))
            if partial:
                if baseline and any(s.name == "finetune" for s in stages):
                    run_baseline(run_dir, [], log=log, reuse_stale=reuse_stale, stages=stages)
                tried.append(run_dir)
                continue
            report = write_report(run_dir, manifest)
            if baseline:
                report = run_baseline(run_dir, [], log=log, reuse_stale=reuse_stale)
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
    if partial:
        return {"points": [], "failed": 0, "stopped_after": stages[-1].name}
    return _write(out, config, grid, overrides, results)


def _write(out: Path, config: str, grid, overrides, results: list[dict]) -> dict:
    from ..report.sweep import PLOTS, render_sweep_markdown, render_sweep_plots

    sweep = {"config": str(config), "grid": {k: v for k, v in grid}, "overrides": list(overrides),
             "points": results, "failed": sum(r["status"] != "done" for r in results)}
    plots = render_sweep_plots(sweep)
    for key, data in plots.items():
        atomic_write_bytes(out / PLOTS[key], data)
    sweep["plots"] = {k: PLOTS[k] for k in plots}   # pareto_budget.png only for a budget (or --baseline) sweep
    write_json(out / "sweep.json", sweep)
    atomic_write_text(out / "sweep.md", render_sweep_markdown(sweep))
    return sweep
