"""report.json / report.md (+ two PNG plots): one entry per ONNX artifact, dense next to pruned."""
from __future__ import annotations

import math
from pathlib import Path

from .runio import atomic_write_bytes, atomic_write_text, write_json

PLOTS = {"widths": "widths.png", "accuracy_latency": "accuracy_latency.png"}


def build_report(manifest: dict) -> dict:
    st = manifest["stages"]
    train, prune, surgery, export, bench = (st[k]["metrics"] for k in ("train", "prune", "surgery", "export", "bench"))
    cfg = manifest["config"]
    models = []
    for variant, evaluated, sparsity, params, macs in (
            ("dense", train["test"], train, surgery["params_before"], surgery["macs_before"]),
            ("pruned", prune["test"], surgery, surgery["params_after"], surgery["macs_after"])):
        accuracy = {k: v for k, v in evaluated.items() if k not in ("test_images", "sanity")}
        models.append({
            "name": f"{cfg['name']}-{variant}",
            "variant": variant,
            "onnx": st["export"]["outputs"][f"{variant}_onnx"]["path"],
            "onnx_sha256": st["export"]["outputs"][f"{variant}_onnx"]["sha256"],
            "params": params,
            "macs": macs,
            "onnx_params": export[variant]["onnx_params"],
            "onnx_macs": export[variant]["onnx_macs"],
            "channel_sparsity": sparsity["channel_sparsity"],
            "weight_sparsity": sparsity["weight_sparsity"],
            "accuracy": accuracy,
            "accuracy_images": evaluated["test_images"],
            "attack_sanity": evaluated["sanity"],
            "onnx_accuracy": bench["accuracy"][variant],
            "parity_max_abs_diff": export[variant]["parity_max_abs_diff"],
            "latency": bench["latency"][variant],
        })
    mac_reduction = surgery["macs_before"] / surgery["macs_after"]
    speedup = [{**s, "mac_reduction": mac_reduction, "efficiency": s["speedup"] / mac_reduction}
               for s in bench["speedup"]]
    headline = next((s for s in speedup if s["batch"] == 1 and s["threads"] == 1), speedup[0])
    sanity = sanity_checks(models)
    # The pruned model's accuracy is measured on the masked model before surgery; surgery is exact
    # with noise off (max_abs_diff below), so the numbers carry over to the physically pruned graph.
    return {
        "run": cfg["name"],
        "git_commit": manifest.get("git_commit"),
        "models": models,
        "sanity": sanity,
        "sanity_failures": sum(not c["ok"] for c in sanity),
        "prune": {"groups": prune.get("groups", "paper"), "align": prune.get("align", 1),
                  "family_widths": prune.get("family_widths", {})},
        "surgery": {k: surgery[k] for k in ("max_abs_diff", "removed_channels", "zero_channels", "total_channels",
                                            "removed_fraction", "kept_for_shape", "layers")},
        "speedup": speedup,
        "headline": headline,
        "profile": bench.get("profile", {}),
        "plots": dict(PLOTS),
        "notes": {
            "accuracy": "torch, percent on the test images; keys *_noise_off have EnResNet's test-time noise off",
            "onnx": "the ONNX graphs are deterministic (noise off); onnx_accuracy compares them with torch",
            "pruned_accuracy": "measured on the masked model before surgery (surgery is exact with noise off)",
            "latency": "every onnxruntime graph optimisation level is timed, interleaved; 'best' marks each "
                       "artifact's fastest level per batch/threads, and speed-up = dense-best / pruned-best. "
                       "Level 'all' includes the NCHWc layout, which pads channel counts to the SIMD block "
                       "(8/16), so unaligned pruned widths keep the padded cost there",
            "efficiency": "latency speed-up / MAC reduction (MACs: torch-pruning count, noise off)",
        },
    }


def sanity_checks(models: list[dict], num_classes: int = 10) -> list[dict]:
    """Checks every honest result passes; a failure is a red line in report.md, never a quiet number.

    - above chance: natural accuracy more than 3 binomial standard errors above 1/num_classes;
    - each attack's accuracy <= the natural accuracy it attacks (noise on: 1 point slack for the test-time noise);
    - the attack orderings the evaluation checked itself (``attack_sanity``)."""
    out = []
    for m in models:
        acc, n = m["accuracy"], m["accuracy_images"]
        chance = 100.0 / num_classes
        limit = chance + 300.0 * math.sqrt(chance / 100 * (1 - chance / 100) / max(n, 1))
        out.append({"model": m["variant"], "check": "above_chance", "ok": acc["natural"] > limit,
                    "detail": f"natural {acc['natural']:.2f}% vs chance {chance:.0f}% (+3 SE = {limit:.1f}% "
                              f"on {n} images)"})
        for k, v in acc.items():
            if k.startswith("natural"):
                continue
            base, slack = ("natural_noise_off", 0.0) if k.endswith("_noise_off") else ("natural", 1.0)
            out.append({"model": m["variant"], "check": f"{k}_not_above_natural", "ok": v <= acc[base] + slack,
                        "detail": f"{k} {v:.2f}% vs {base} {acc[base]:.2f}%"})
        out += [{"model": m["variant"], "check": k, "ok": bool(ok), "detail": "evaluation-time attack check"}
                for k, ok in m.get("attack_sanity", {}).items()]
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def _deployed_accuracy(model: dict) -> dict[str, float]:
    """Natural and PGD accuracy of the function the ONNX graph computes (noise off where it differs)."""
    acc = model["accuracy"]
    pgd = next(k for k in acc if k.startswith("pgd") and "_" not in k)
    if "natural_noise_off" in acc:
        return {"natural": acc["natural_noise_off"], pgd: acc[f"{pgd}_noise_off"]}
    return {"natural": acc["natural"], pgd: acc[pgd]}


def render_markdown(report: dict) -> str:
    dense, pruned = report["models"]
    h, s, pr = report["headline"], report["surgery"], report["prune"]
    rows = [("params", "params"), ("MACs", "macs"), ("ONNX params", "onnx_params"), ("ONNX MACs", "onnx_macs"),
            ("channel sparsity (%)", "channel_sparsity"), ("weight sparsity (%)", "weight_sparsity")]
    lines = [f"# Run `{report['run']}`", ""]
    lines += [f"> **SANITY CHECK FAILED** ({c['model']}, {c['check']}): {c['detail']}" for c in report["sanity"]
              if not c["ok"]]
    lines += ["" if report["sanity_failures"] else "All sanity checks passed (report.json `sanity`).", "",
              f"commit `{report['git_commit']}`", "",
             f"**Speed-up {h['speedup']:.2f}x** (dense-best {h['dense_p50_ms']:.3f} ms, ORT {h['dense_level']} ÷ "
             f"pruned-best {h['pruned_p50_ms']:.3f} ms, ORT {h['pruned_level']}; batch {h['batch']}, "
             f"{h['threads']} thread(s)) for a **{h['mac_reduction']:.2f}x** MAC reduction: efficiency "
             f"**{h['efficiency']:.2f}**. Pruning groups: {pr['groups']}, widths aligned to {pr['align']}.", "",
             "| | dense | pruned |", "|---|---:|---:|"]
    lines += [f"| {label} | {_fmt(dense[k])} | {_fmt(pruned[k])} |" for label, k in rows]
    for k in dense["accuracy"]:
        lines.append(f"| accuracy {k} (%) | {_fmt(dense['accuracy'][k])} | {_fmt(pruned['accuracy'].get(k))} |")
    lines.append(f"| ONNX accuracy, onnxruntime (%) | {_fmt(dense['onnx_accuracy']['onnxruntime'])} "
                 f"| {_fmt(pruned['onnx_accuracy']['onnxruntime'])} |")
    lines.append(f"| same images, torch noise off (%) | {_fmt(dense['onnx_accuracy']['torch_noise_off'])} "
                 f"| {_fmt(pruned['onnx_accuracy']['torch_noise_off'])} |")
    lines.append(f"| ONNX file | `{dense['onnx']}` | `{pruned['onnx']}` |")

    lines += ["", "## Speed-up per setting (best level of each artifact)", "",
              "| batch | threads | dense-best (ms) | pruned-best (ms) | speed-up | efficiency |",
              "|---:|---:|---|---|---:|---:|"]
    lines += [f"| {x['batch']} | {x['threads']} | {x['dense_p50_ms']:.3f} ({x['dense_level']}) | "
              f"{x['pruned_p50_ms']:.3f} ({x['pruned_level']}) | {x['speedup']:.2f}x | {x['efficiency']:.2f} |"
              for x in report["speedup"]]
    cpu = dense["latency"][0].get("cpu", "?")
    lines += ["", f"## Latency, every level ({cpu}; p50 / p90 ms; * = best level of that artifact)", "",
              "| batch | threads | ORT level | dense | pruned |", "|---:|---:|---|---:|---:|"]
    for d, p in zip(dense["latency"], pruned["latency"]):
        cell = lambda r: f"{r['p50_ms']:.3f} / {r['p90_ms']:.3f}{' *' if r.get('best') else ''}"  # noqa: E731
        lines.append(f"| {d['batch']} | {d['threads']} | {d['graph_optimization']} | {cell(d)} | {cell(p)} |")

    prof = report.get("profile")
    if prof:
        d, p = prof["dense"], prof["pruned"]
        ops = list(dict.fromkeys([*d["ops"], *p["ops"]]))
        us = lambda side, op: side["ops"].get(op, {}).get("us_per_run", 0.0)  # noqa: E731
        lines += ["", f"## Where the time goes (onnxruntime profiler, batch {d['batch']}, {d['threads']} thread(s); "
                      f"dense at {d['graph_optimization']}, pruned at {p['graph_optimization']})", "",
                  "| op type (optimised graph) | dense µs/run | pruned µs/run | dense ÷ pruned |", "|---|---:|---:|---:|"]
        lines += [f"| {op} | {us(d, op):.1f} | {us(p, op):.1f} | "
                  f"{us(d, op) / us(p, op) if us(p, op) else float('inf'):.2f} |" for op in ops]
        total_d, total_p = (sum(x["us_per_run"] for x in side["ops"].values()) for side in (d, p))
        lines += [f"| **all kernels** | {total_d:.1f} | {total_p:.1f} | {total_d / total_p:.2f} |", "",
                  "Profiled one artifact after the other (not interleaved) and with the profiler's own overhead: "
                  "read it for where the time goes, and the latency tables for how long it takes."]
    lines += ["", "## Surgery and per-layer widths", "",
              f"Surgery removed {s['removed_channels']} of {s['zero_channels']} zero input channels "
              f"(**{100 * s['removed_fraction']:.1f}%**; {s['kept_for_shape']} kept only so that no layer reaches "
              f"width 0; {s['total_channels']} in all); masked-vs-pruned max |Δlogits| = {s['max_abs_diff']:.2e} "
              "(noise off).", "", f"![per-layer widths]({report['plots']['widths']})", "",
              "| layer | in: dense → pruned | out: dense → pruned |", "|---|---:|---:|"]
    lines += [f"| {r['name']} | {r['in_dense']} → {r['in_pruned']} | {r['out_dense']} → {r['out_pruned']} |"
              for r in s["layers"]]
    lines += ["", "## Accuracy vs latency", "", f"![accuracy vs latency]({report['plots']['accuracy_latency']})", "",
              f"Accuracy on {dense['accuracy_images']} test images. "
              + " ".join(f"{k}: {v}." for k, v in report["notes"].items()), ""]
    return "\n".join(lines)


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def render_plots(report: dict) -> dict[str, bytes]:
    """PNG bytes: per-layer output widths (dense vs pruned), and accuracy vs best batch-1 latency."""
    import matplotlib

    matplotlib.use("Agg")   # no display here, and none needed
    import matplotlib.pyplot as plt

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
    widths = _png(fig)
    plt.close(fig)

    h = report["headline"]
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for model, color in zip(report["models"], ("#9aa8b8", "#2b6cb0")):
        best = next(r for r in model["latency"]
                    if r.get("best") and r["batch"] == h["batch"] and r["threads"] == h["threads"])
        for (kind, acc), marker in zip(_deployed_accuracy(model).items(), ("o", "^")):
            ax.scatter([best["p50_ms"]], [acc], color=color, marker=marker, s=60,
                       label=f"{model['variant']} {kind}")
            ax.annotate(f"{acc:.1f}", (best["p50_ms"], acc), textcoords="offset points", xytext=(6, 3), fontsize=8)
    ax.set_xlabel(f"p50 latency, best ORT level, batch {h['batch']}, {h['threads']} thread(s) (ms)")
    ax.set_ylabel("accuracy, noise off (%)")
    ax.set_title(f"{report['run']}: accuracy vs latency")
    ax.legend(fontsize=8)
    scatter = _png(fig)
    plt.close(fig)
    return {PLOTS["widths"]: widths, PLOTS["accuracy_latency"]: scatter}


def write_report(run_dir: Path, manifest: dict) -> dict:
    report = build_report(manifest)
    for name, data in render_plots(report).items():
        atomic_write_bytes(run_dir / name, data)
    write_json(run_dir / "report.json", report)
    atomic_write_text(run_dir / "report.md", render_markdown(report))
    return report
