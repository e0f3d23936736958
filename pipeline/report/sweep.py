"""sweep.md, sweep.json rows and plots: one row per grid point (the Table-2 columns of its pruned model)."""
from __future__ import annotations

from ..catalog.attacks import names
from .format import fmt as _fmt, png, pyplot

PLOTS = {"accuracy": "sweep_accuracy.png", "sparsity": "sweep_sparsity.png", "budget": "pareto_budget.png"}


def point_row(cfg, manifest: dict, report: dict) -> dict:
    """The Table-2 columns of the point's pruned model (paper mode: noise on, one pass, when it has noise)."""
    st = manifest["stages"]
    ev = st["eval"]["metrics"]
    name = "pruned" if "pruned" in ev["models"] else next(iter(ev["models"]), None)
    modes = ev["models"].get(name, {})
    res = modes.get("stochastic") or modes.get("noise_off") or {}
    if "same_as" in res:
        res = ev["models"][res["same_as"]].get("stochastic") or ev["models"][res["same_as"]].get("noise_off", {})
    acc = {a: row["accuracy"] for a, row in res.get("attacks", {}).items()}
    a2, a3, a4 = (acc.get(k) for k in names("paper"))
    surgery, pruned = st["surgery"]["metrics"], report["models"][1]
    headline = report.get("headline", {})
    return {
        "net": cfg.model.arch if cfg.model.ensemble == 1 else f"En{cfg.model.ensemble} {cfg.model.arch}",
        "method": cfg.prune.method, "hyper": method_hyper(cfg),
        "evaluated": f"{name}, {'noise on, 1 pass' if 'stochastic' in modes else 'noise off'}",
        "a1": res.get("natural"), "a2": a2, "a3": a3, "a4": a4,
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
        # the budget view: noise off (the deployed function), best latency at batch 1 / 1 thread
        "budget": cfg.prune.budget, "target": cfg.prune.target if cfg.prune.budget != "none" else None,
        "deployed": deployed_row(report),
    }


def deployed_row(report: dict) -> dict:
    """Dense, pruned and (with a baseline) thin: natural / PGD / worst case with the noise off, best p50."""
    from .build import _noise_off

    h = report.get("headline", {})
    models = report["robustness"]["models"]
    out = {"dense": {**_noise_off(models, "dense"), "p50_ms": h.get("dense_p50_ms")},
           "pruned": {**_noise_off(models, "pruned"), "p50_ms": h.get("pruned_p50_ms")}}
    if report.get("baseline"):
        out["thin"] = report["baseline"]["rows"][2]
    return out


def method_hyper(cfg) -> dict:
    """The selected sparsifier's settings ([prune.<method>]); none for "none"."""
    import dataclasses

    settings = cfg.prune.settings
    return dataclasses.asdict(settings) if settings is not None else {}


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
    lines += _budget_table(sweep)
    lines += ["", f"![accuracy vs channel sparsity]({PLOTS['accuracy']})",
              f"![removable vs paper channel sparsity]({PLOTS['sparsity']})", ""]
    if _budget_points(sweep):
        lines += [f"![accuracy vs measured latency]({PLOTS['budget']})", ""]
    return "\n".join(lines)


def _budget_points(sweep: dict) -> list[dict]:
    return [r for r in sweep["points"] if r["status"] == "done" and r.get("deployed")
            and (r.get("target") is not None or "thin" in r["deployed"])]


def _budget_table(sweep: dict) -> list[str]:
    """Accuracy (noise off) against measured best latency: pruned, thin from scratch, dense."""
    done = _budget_points(sweep)
    if not done:
        return []
    key = next((m.get("pgd_key") for r in done for m in r["deployed"].values() if m.get("pgd_key")), "pgd")
    lines = ["", "## Accuracy against measured latency (noise off; best ORT level, batch 1, 1 thread)", "",
             f"PGD: `{key}`. Thin: the pruned widths trained from scratch for the same total epochs "
             "(`--baseline`). A pruned model's speed-up is against the dense graph timed beside it in its own run "
             "(its `report.md` headline); the dense row is the first point's.", "",
             "| point | target | model | p50 (ms) | speed-up vs dense | natural (%) | PGD (%) | worst case (%) |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    dense = done[0]["deployed"]["dense"]
    lines.append(f"| dense | – | dense | {_fmt(dense['p50_ms'], 3)} | 1.00 | {_fmt(dense['natural'])} | "
                 f"{_fmt(dense['pgd'])} | {_fmt(dense['worst_case'])} |")
    for r in done:
        own_dense = r["deployed"]["dense"].get("p50_ms")
        for model in ("pruned", "thin"):
            m = r["deployed"].get(model)
            if not m:
                continue
            # pruned: against the dense graph timed beside it in the same run; thin was timed in its own run
            speedup = r.get("speedup") if model == "pruned" else (
                own_dense / m["p50_ms"] if own_dense and m.get("p50_ms") else None)
            lines.append(f"| {r['name']} | {_fmt(r.get('target'))} | {model} | {_fmt(m['p50_ms'], 3)} | "
                         f"{_fmt(speedup)}{'' if model == 'pruned' else ' (across runs)'} | {_fmt(m['natural'])} | "
                         f"{_fmt(m['pgd'])} | {_fmt(m['worst_case'])} |")
    return lines


def render_sweep_plots(sweep: dict) -> dict[str, bytes]:
    plt = pyplot()
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
    out["accuracy"] = png(fig)
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
    out["sparsity"] = png(fig)
    budget = _budget_points(sweep)
    if budget:
        out["budget"] = _budget_plot(budget, plt)
    return out


def _budget_plot(points: list[dict], plt) -> bytes:
    """pareto_budget.png: natural and PGD accuracy (noise off) against measured best latency, pruned and thin
    points per target, the dense model as a star."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    dense = points[0]["deployed"]["dense"]
    for metric, color in (("natural", "#2b6cb0"), ("pgd", "#c05621")):
        for model, marker, fill in (("pruned", "o", True), ("thin", "s", False)):
            pts = [(r["deployed"][model]["p50_ms"], r["deployed"][model][metric], r.get("target"))
                   for r in points if model in r["deployed"] and r["deployed"][model].get(metric) is not None]
            if not pts:
                continue
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ls="-" if fill else ":", color=color,
                    markerfacecolor=color if fill else "none", label=f"{model}, {metric}")
            for x, y, target in pts:
                if target is not None:
                    ax.annotate(f"{target:g}x", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        if dense.get(metric) is not None:
            ax.scatter([dense["p50_ms"]], [dense[metric]], marker="*", s=140, color=color, zorder=3,
                       label=f"dense, {metric}")
    ax.set_xlabel("measured p50 latency, best ORT level, batch 1, 1 thread (ms)")
    ax.set_ylabel("test accuracy, noise off (%)")
    ax.set_title("budget sweep: accuracy vs latency (targets annotated)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return png(fig)
