"""The quantized robustness table: each deployed model's float graph beside its quantized graphs (PTQ int8, QAT
int8, Binary-Relax, ADMM grid), every one attacked white-box -- the float model by the eval stage, the quantized
graphs through their torch twins by the qeval stage -- with the same attacks on the same images."""
from __future__ import annotations

METHOD_LABEL = {"ptq": "PTQ int8 (onnxruntime)", "qat": "QAT int8", "binary_relax": "Binary-Relax", "admm": "ADMM grid"}


def quantized_rows(st: dict) -> list[dict]:
    ev = st["eval"]["metrics"]
    q = st.get("qeval", {}).get("metrics", {}).get("models", {})
    quant = st.get("quantize", {}).get("metrics", {})
    export = st.get("export", {}).get("metrics", {})
    rows = []
    for model in ("dense", "pruned"):
        float_res = ev["models"].get(model, {}).get("noise_off")
        if float_res and "natural" in float_res:
            rows.append({"artifact": model, "model": model, "method": "float", "bits": 32,
                         "bytes": export.get(model, {}).get("bytes"), "natural": float_res["natural"],
                         "attacks": {k: v["accuracy"] for k, v in float_res.get("attacks", {}).items()},
                         "worst_case": float_res.get("worst_case"), "transfer_worst": None,
                         "grid_sparsity": None, "twin_max_abs_diff": None})
        for name, res in q.items():
            if res.get("model") != model:
                continue
            made = quant.get(name, {})
            transfer = res.get("transfer", {})
            rows.append({"artifact": name, "model": model, "method": made.get("method", "ptq"),
                         "bits": made.get("bits", 8), "bytes": made.get("bytes"),
                         "natural": res.get("natural"), "natural_onnx": res.get("natural_onnx"),
                         "attacks": {k: v["accuracy"] for k, v in res.get("attacks", {}).items()},
                         "worst_case": res.get("worst_case"),
                         "transfer_worst": min(transfer.values()) if transfer else None,
                         "grid_sparsity": made.get("grid_sparsity"),
                         "twin_max_abs_diff": made.get("twin_max_abs_diff"),
                         "skipped": res.get("skipped")})
    return rows


def qeval_sanity(st: dict) -> list[dict]:
    q = st.get("qeval", {}).get("metrics", {}).get("models", {})
    return [{"model": f"{name} (white-box twin)", **c} for name, res in q.items() for c in res.get("sanity", [])]


def _fmt(v, spec=".2f"):
    return "–" if v is None else format(v, spec)


def quantized_lines(report: dict) -> list[str]:
    rows = report.get("quantized") or []
    if not any(r["method"] != "float" for r in rows):
        return []
    attacks = list(dict.fromkeys(a for r in rows for a in r["attacks"]))
    cascade = report.get("robustness", {}).get("mode") == "cascade"
    lines = ["", "## Quantized and still robust (white-box on what ships)", "",
             "Every quantized graph is attacked through its torch twin -- the ONNX graph interpreted in torch, "
             "gradients straight through the rounding (BPDA) -- with the float models' attacks on the same "
             f"{report['robustness']['images']} test images, noise off (the deployed function)"
             + ("; attack columns are cumulative (cascade)" if cascade else "") + ". Transfer: the same graph in "
             "onnxruntime on examples crafted on its float model (worst attack); white-box must not be above it.",
             "", "| artifact | method | bits | size (kB) | natural | " + " | ".join(attacks)
             + " | worst case | transfer worst | weight zeros (%) | twin max abs Δ |",
             "|---|---|---:|---:|---:|" + "---:|" * len(attacks) + "---:|---:|---:|---:|"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['artifact']} | {METHOD_LABEL.get(r['method'], r['method'])} | {r['bits']} | "
                         f"{_fmt(r['bytes'] and r['bytes'] / 1e3, '.0f')} | not attacked: {r['skipped']} |")
            continue
        lines.append(f"| {r['artifact']} | {METHOD_LABEL.get(r['method'], r['method'])} | {r['bits']} | "
                     f"{_fmt(r['bytes'] and r['bytes'] / 1e3, '.0f')} | {_fmt(r['natural'])} | "
                     + " | ".join(_fmt(r["attacks"].get(a)) for a in attacks)
                     + f" | {_fmt(r['worst_case'])} | {_fmt(r['transfer_worst'])} | {_fmt(r['grid_sparsity'], '.1f')}"
                     f" | {_fmt(r['twin_max_abs_diff'], '.1e')} |")
    return lines
