"""report.json / report.md: one entry per evaluated artifact, dense next to pruned."""
from __future__ import annotations

from pathlib import Path

from .runio import atomic_write_text, write_json


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
    # The pruned model's accuracy is measured on the masked model before surgery; surgery is exact
    # with noise off (max_abs_diff below), so the numbers carry over to the physically pruned graph.
    return {
        "run": cfg["name"],
        "git_commit": manifest.get("git_commit"),
        "models": models,
        "surgery": {k: surgery[k] for k in ("max_abs_diff", "removed_channels", "zero_channels", "total_channels",
                                            "removed_fraction", "kept_for_shape")},
        "speedup_p50": bench["speedup_p50"],
        "notes": {
            "accuracy": "torch, percent on the test images; keys *_noise_off have EnResNet's test-time noise off",
            "onnx": "the ONNX graphs are deterministic (noise off); onnx_accuracy compares them with torch",
            "pruned_accuracy": "measured on the masked model before surgery (surgery is exact with noise off)",
            "latency": "ORT 'all' includes the NCHWc layout transform, which pads channel counts to the SIMD "
                       "block (8/16); pruned widths that are not multiples of it keep the dense cost there",
        },
    }


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def render_markdown(report: dict) -> str:
    dense, pruned = report["models"]
    rows = [("params", "params"), ("MACs", "macs"), ("ONNX params", "onnx_params"), ("ONNX MACs", "onnx_macs"),
            ("channel sparsity (%)", "channel_sparsity"), ("weight sparsity (%)", "weight_sparsity")]
    lines = [f"# Run `{report['run']}`", "", f"commit `{report['git_commit']}`", "",
             "| | dense | pruned |", "|---|---:|---:|"]
    lines += [f"| {label} | {_fmt(dense[k])} | {_fmt(pruned[k])} |" for label, k in rows]
    for k in dense["accuracy"]:
        lines.append(f"| accuracy {k} (%) | {_fmt(dense['accuracy'][k])} | {_fmt(pruned['accuracy'].get(k))} |")
    lines.append(f"| ONNX accuracy, onnxruntime (%) | {_fmt(dense['onnx_accuracy']['onnxruntime'])} "
                 f"| {_fmt(pruned['onnx_accuracy']['onnxruntime'])} |")
    lines.append(f"| same images, torch noise off (%) | {_fmt(dense['onnx_accuracy']['torch_noise_off'])} "
                 f"| {_fmt(pruned['onnx_accuracy']['torch_noise_off'])} |")
    for d, p in zip(dense["latency"], pruned["latency"]):
        lines.append(f"| latency p50 / p90 (ms), {d['device']}, ORT {d['graph_optimization']}, {d['threads']} thr, "
                     f"batch {d['batch']} "
                     f"| {d['p50_ms']:.3f} / {d['p90_ms']:.3f} | {p['p50_ms']:.3f} / {p['p90_ms']:.3f} |")
    lines.append(f"| ONNX file | `{dense['onnx']}` | `{pruned['onnx']}` |")
    s = report["surgery"]
    speedups = ", ".join(f"**{v:.2f}x** (ORT {k})" for k, v in report["speedup_p50"].items())
    lines += ["", f"p50 speedup (dense / pruned): {speedups} on {dense['latency'][0].get('cpu', '?')}.", "",
              f"Surgery removed {s['removed_channels']} of {s['zero_channels']} zero input channels "
              f"({100 * s['removed_fraction']:.1f}%; {s['total_channels']} in all); "
              f"masked-vs-pruned max |Δlogits| = {s['max_abs_diff']:.2e} (noise off).", "",
              f"Accuracy on {dense['accuracy_images']} test images. " + " ".join(f"{k}: {v}." for k, v in report["notes"].items()), ""]
    return "\n".join(lines)


def write_report(run_dir: Path, manifest: dict) -> dict:
    report = build_report(manifest)
    write_json(run_dir / "report.json", report)
    atomic_write_text(run_dir / "report.md", render_markdown(report))
    return report
