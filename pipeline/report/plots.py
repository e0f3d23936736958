"""The run report's PNG plots: per-layer widths, accuracy vs latency, latency per device, and the Pareto plot."""
from __future__ import annotations

from .build import PLOTS
from .format import png, pyplot


def deployed_accuracy(model: dict, report: dict) -> dict[str, float]:
    """Natural and strongest-attack (worst case) accuracy of the function the ONNX graph computes (noise off)."""
    res = report["robustness"]["models"].get(model["variant"], {})
    res = res.get("noise_off") or res.get("stochastic") or {}
    out = {"natural": res["natural"]} if "natural" in res else {}
    if "worst_case" in res:
        out["worst case"] = res["worst_case"]
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both latency (lower) and accuracy (higher)."""
    keep = []
    for i, (lat, acc) in enumerate(points):
        if not any((l2 <= lat and a2 >= acc) and (l2 < lat or a2 > acc) for j, (l2, a2) in enumerate(points)
                   if j != i):
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


def pareto_points(report: dict, rows: list[dict]) -> list[tuple[str, str, float, float]]:
    """(artifact, "natural" | "robust", host p50 ms, accuracy %) of every artifact benched on the host. Robust is the
    white-box worst case of the artifact's torch twin (the security claim); int8 has no twin, so its point is
    onnxruntime on its float model's examples (transfer, an upper bound)."""
    host = [r for r in rows if not r["emulated"] and report["devices"].get(r["device"], {}).get("kind") == "host"]
    out = []
    for v in report.get("variants", []):
        lat = next((r["p50_ms"] for r in host if r["artifact"] == v["artifact"]), None)
        if lat is None:
            continue
        robust = v.get("whitebox_worst_case")
        robust = v.get("onnx_worst_attack") if robust is None else robust
        for kind, acc in (("natural", v["natural_onnx"]), ("robust", robust)):
            if acc is not None:
                out.append((v["artifact"], kind, lat, acc))
    return out


def pareto_figure(report: dict, rows: list[dict], plt):
    """Accuracy against host latency, one colour per artifact (named in the legend, so no label overlaps another),
    natural (o) and robust (^); each kind's Pareto front is the dashed line through its front points, ringed."""
    points = pareto_points(report, rows)
    fig, ax = plt.subplots(figsize=(6.6, 4.4))
    artifacts = list(dict.fromkeys(p[0] for p in points))
    colors = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(artifacts)}
    for kind, marker in (("natural", "o"), ("robust", "^")):
        pts = [p for p in points if p[1] == kind]
        for name, _, lat, acc in pts:
            ax.scatter([lat], [acc], marker=marker, color=colors[name], s=40, zorder=3)
        front = pareto_front([(p[2], p[3]) for p in pts])
        ax.plot([pts[j][2] for j in front], [pts[j][3] for j in front], color="#444", lw=1, ls="--", marker="o",
                markersize=12, markerfacecolor="none", zorder=2, gid=f"pareto-{kind}")
    handles = [plt.Line2D([], [], ls="", marker="s", color=colors[a], label=a) for a in artifacts]
    handles += [plt.Line2D([], [], ls="", marker=m, color="#666", label=k) for k, m in (("natural", "o"),
                                                                                          ("robust", "^"))]
    handles.append(plt.Line2D([], [], ls="--", color="#444", marker="o", markerfacecolor="none", label="Pareto front"))
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xlabel("host p50 latency, batch 1, 1 thread, ORT level all (ms)")
    ax.set_ylabel("accuracy (%): natural; robust = white-box worst case\n(int8: transfer from its float model)")
    ax.set_title(f"{report['run']}: accuracy vs latency (dashed: Pareto front)", fontsize=9)
    ax.grid(alpha=0.3)
    return fig


def render_plots(report: dict) -> dict[str, bytes]:
    """PNG bytes: per-layer output widths (dense vs pruned), and accuracy vs best batch-1 latency."""
    plt = pyplot()

    layers = report["surgery"]["layers"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(layers)), 3.6))
    xs = range(len(layers))
    ax.bar([x - 0.2 for x in xs], [r["out_dense"] for r in layers], width=0.4, label="dense", color="#9aa8b8")
    ax.bar([x + 0.2 for x in xs], [r["out_pruned"] for r in layers], width=0.4, label="pruned", color="#2b6cb0")
    ax.set_xticks(list(xs), [r["name"].replace("members.", "m") for r in layers], rotation=90, fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title(f"{report['run']}: per-layer widths ({report['prune']['groups']} groups, "
                 f"align {report['prune']['align']})")
    ax.legend()
    widths = png(fig)

    h = report["headline"]
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for model, color in zip(report["models"], ("#9aa8b8", "#2b6cb0")):
        best = next(r for r in model["latency"]
                    if r.get("best") and r["batch"] == h["batch"] and r["threads"] == h["threads"])
        for (kind, acc), marker in zip(deployed_accuracy(model, report).items(), ("o", "^")):
            ax.scatter([best["p50_ms"]], [acc], color=color, marker=marker, s=60,
                       label=f"{model['variant']} {kind}")
            ax.annotate(f"{acc:.1f}", (best["p50_ms"], acc), textcoords="offset points", xytext=(6, 3), fontsize=8)
    ax.set_xlabel(f"p50 latency, best ORT level, batch {h['batch']}, {h['threads']} thread(s) (ms)")
    ax.set_ylabel("accuracy, noise off (%)")
    ax.set_title(f"{report['run']}: accuracy vs latency")
    ax.legend(fontsize=8)
    scatter = png(fig)
    out = {PLOTS["widths"]: widths, PLOTS["accuracy_latency"]: scatter}
    out.update(_device_plots(report, plt))
    return out


def _device_plots(report: dict, plt) -> dict[str, bytes]:
    rows = [r for r in report.get("latency", []) if r["graph_optimization"] == "all" and r["batch"] == 1
            and r["threads"] == 1]
    if not rows:
        return {}
    devices = list(dict.fromkeys(r["device"] for r in rows))
    arts = list(dict.fromkeys(r["artifact"] for r in rows))
    fig, axes = plt.subplots(1, len(devices), figsize=(2.0 + 3.2 * len(devices), 3.8), squeeze=False, sharey=True)
    for i, (ax, dev) in enumerate(zip(axes[0], devices)):
        vals = [next((r["p50_ms"] for r in rows if r["device"] == dev and r["artifact"] == a), 0.0) for a in arts]
        emulated = any(r["emulated"] for r in rows if r["device"] == dev)
        ax.barh(arts, vals, color="#c05621" if emulated else "#2b6cb0")
        ax.set_xlabel("emulated p50 (ms): NOT a latency" if emulated else "p50 latency (ms)")
        ax.set_title(f"{dev}, batch 1, 1 thread", fontsize=9)
        ax.tick_params(labelleft=i == 0)
    axes[0][0].invert_yaxis()
    latency_devices = png(fig)

    pareto = png(pareto_figure(report, rows, plt))
    return {PLOTS["latency_devices"]: latency_devices, PLOTS["pareto"]: pareto}


