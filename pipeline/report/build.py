"""report.json: one entry per ONNX artifact, dense next to pruned, built from the manifest's stage metrics."""
from __future__ import annotations

import math

from ..catalog.artifacts import REQUIRED_OPERATORS, ort_key, stage_of
from .quantized import qeval_sanity, quantized_rows

PLOTS = {"widths": "widths.png", "accuracy_latency": "accuracy_latency.png",
         "latency_devices": "latency_devices.png", "pareto": "pareto.png"}


def flat_accuracy(evaluated: dict) -> dict[str, float]:
    """eval-stage results of one model as report.json ``accuracy``: keys name the attack and its parameters;
    ``_noise_off`` = test-time noise off, ``_per_sample`` = noise scale per image, ``_avgK`` = softmax averaged over
    K stochastic passes."""
    out = {}
    for mode, res in evaluated.items():
        if "natural" not in res:
            continue
        suffix = {"noise_off": "_noise_off" if "stochastic" in evaluated else "",
                  "per_sample": "_per_sample"}.get(mode, "")
        out[f"natural{suffix}"] = res["natural"]
        for k, v in res.items():
            if k.startswith("natural_avg"):
                out[k] = v
        for row in res["attacks"].values():
            out[f"{row['key']}{suffix}"] = row["accuracy"]
            for k, v in row.items():
                if k.startswith("accuracy_avg"):
                    out[f"{row['key']}_{k.removeprefix('accuracy_')}"] = v
        if "worst_case" in res:
            out[f"worst_case{suffix}"] = res["worst_case"]
    return out


def build_report(manifest: dict, baseline: dict | None = None) -> dict:
    """report.json from the manifest; ``baseline``: the report of ``pipeline baseline``'s thin network, if any."""
    st = manifest["stages"]
    prune, surgery, export, bench, ev, transfer = (
        st[k]["metrics"] for k in ("prune", "surgery", "export", "bench", "eval", "transfer"))
    train = st["train"]["metrics"]
    cfg = manifest["config"]
    models = []
    for variant, sparsity, params, macs in (
            ("dense", train, surgery["params_before"], surgery["macs_before"]),
            ("pruned", surgery, surgery["params_after"], surgery["macs_after"])):
        evaluated = ev["models"].get(variant, {})
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
            "channel_weight_sparsity": sparsity.get("channel_weight_sparsity"),
            "weight_sparsity": sparsity["weight_sparsity"],
            "accuracy": flat_accuracy(evaluated),
            "accuracy_images": ev["images"],
            "onnx_transfer": transfer["models"].get(variant, {}),
            "onnx_accuracy": bench["accuracy"][variant],
            "parity_max_abs_diff": export[variant]["parity_max_abs_diff"],
            "latency": bench["latency"][variant],
        })
    mac_reduction = surgery["macs_before"] / surgery["macs_after"]
    speedup = [{**s, "mac_reduction": mac_reduction, "efficiency": s["speedup"] / mac_reduction}
               for s in bench["speedup"]]
    headline = next((s for s in speedup if s["batch"] == 1 and s["threads"] == 1), speedup[0])
    sanity = sanity_checks(models, ev, transfer, ev.get("num_classes", 10)) + qeval_sanity(st)
    # The pruned model's accuracy is measured on the masked model before surgery; surgery is exact
    # with noise off (max_abs_diff below), so the numbers carry over to the physically pruned graph.
    return {
        "run": cfg["name"],
        "git_commit": manifest.get("git_commit"),
        "models": models,
        "sanity": sanity,
        "sanity_failures": sum(not c["ok"] for c in sanity),
        "prune": {"method": prune.get("method", "rgsm"), "groups": prune.get("groups", "paper"),
                  "align": prune.get("align", 1), "family_widths": prune.get("family_widths", {}),
                  "before_final_projection": prune.get("before_final_projection")},
        "surgery": {k: surgery.get(k) for k in ("max_abs_diff", "removed_channels", "zero_channels",
                                                "total_channels", "removed_fraction", "kept_for_shape", "layers",
                                                "removed_branches")},
        "budget": budget_summary(prune.get("budget"), st, headline),
        "finetune": {k: v for k, v in st.get("finetune", {}).get("metrics", {}).items()
                     if k in ("epochs", "selected_epoch", "val")},
        "baseline": baseline_summary(ev, headline, baseline, manifest["config"]) if baseline else None,
        "speedup": speedup,
        "headline": headline,
        "profile": bench.get("profile", {}),
        "latency": bench.get("latency_all", []),
        "devices": bench.get("devices", {}),
        "variants": variant_rows(st, ev, transfer, bench),
        "noise_overhead": bench.get("noise_overhead", []),
        "int8": bench.get("int8", []),
        "mobile": mobile_summary(st, bench),
        "quantized": quantized_rows(st),
        "robustness": {"images": ev["images"], "modes": ev["modes"], "models": ev["models"],
                       "mode": ev.get("mode", "full"),
                       "attacks": ev["attacks"], "seconds": ev["seconds"], "images_per_s": ev["images_per_s"],
                       "onnx_transfer": transfer["models"]},
        "paper": {k: v for k, v in cfg.get("paper", {}).items() if v not in (None, "")},
        "train_epochs": cfg["train"]["epochs"],
        "plots": dict(PLOTS),
        "notes": {
            "accuracy": "torch, percent of the test images classified correctly both clean and attacked; keys "
                        "name the attack and its parameters; *_noise_off: EnResNet's test-time noise off; "
                        "*_avgK: softmax averaged over K noisy passes; cw_paper is the reference code's weak "
                        "C&W variant (perturbation rescaled by 0.031)",
            "onnx": "dense.onnx / pruned.onnx are deterministic (noise off); onnx_accuracy compares them with torch. "
                    "*_stochastic.onnx keep the noise as trained (std over the batch tensor), *_per_sample.onnx "
                    "take each image's std alone, *_int8.onnx are static QDQ int8 of the deterministic graphs",
            "devices": "latency rows carry device, emulated, runtime, provider, threads, batch, p50/p90/p99 ms; "
                       "emulated rows (qemu-user) time the emulator, not ARM silicon, and are never a latency",
            "pruned_accuracy": "measured on the physically pruned model (after finetune when finetune.epochs > 0); "
                               "the masked model's noise-off row equals it when there was no fine-tuning",
            "budget": "prune.budget: the cost model's figures for the final layout (macs/params counted like "
                      "torch-pruning; latency from the latency stage's table of measured units plus an offset), "
                      "beside the headline best-vs-best speed-up and, for latency, the bench's measurement",
            "baseline": "pipeline baseline: the pruned widths trained from scratch for the same total epochs "
                        "(Liu et al. 2019); noise off, best level at batch 1 / 1 thread",
            "latency": "every onnxruntime graph optimisation level is timed, interleaved; 'best' marks each "
                       "artifact's fastest level per batch/threads, and speed-up = dense-best / pruned-best. "
                       "Level 'all' includes the NCHWc layout, which pads channel counts to the SIMD block "
                       "(8/16), so unaligned pruned widths keep the padded cost there",
            "efficiency": "latency speed-up / MAC reduction (MACs: torch-pruning count, noise off)",
            "mobile": "<name>.ort: the deterministic and quantized graphs in onnxruntime's mobile format (mobile "
                      "stage; optimised ahead of time at mobile.optimization_level), benched as artifacts "
                      "'<name>.ort' (format 'ort'); agreement = top-1 agreement with its .onnx on the test subset; "
                      "NNAPI / CoreML: onnxruntime's usability checker by op type (supported: one partition with "
                      "> 75 % of the nodes; partial: worth measuring; unsupported: the CPU provider does better), "
                      "'fixed shape' = only once the batch dimension is fixed; required_operators.config lists "
                      "the ops a reduced onnxruntime build needs for every .ort file of the run",
            "sparsity": "conv weights only, all members, in every denominator (BN, biases and the classifier are "
                        "never counted). channel_sparsity: input-channel groups with l2 norm < 1e-15 (the paper's "
                        "Ch. Sp.); channel_weight_sparsity: weights inside those groups (the reference code's "
                        "'weight sparsity', e.g. 10.917 % for its 25.33 % ResNet20); weight_sparsity: exactly zero "
                        "weights (the paper's unstructured 'Sp.')",
        },
    }


def budget_summary(budget: dict | None, st: dict, headline: dict) -> dict | None:
    """What the budget asked and what it got: the cost model's figures for the final layout, the headline speed-up,
    and for a latency budget the table's prediction beside the bench's measurement on the budget device."""
    if not budget:
        return None
    out = {**budget, "measured_speedup": headline["speedup"]}
    if budget["kind"] == "latency":
        table = st["latency"]["metrics"]
        rows = {r["artifact"]: r["p50_ms"] for r in st["bench"]["metrics"].get("latency_all", [])
                if r["device"] == table["device"] and r["batch"] == 1 and r["threads"] == 1
                and r["graph_optimization"] == "all" and r["artifact"] in ("dense", "pruned")}
        out.update(device=table["device"], predicted_dense_ms=budget["dense"],
                   predicted_pruned_ms=budget.get("latency_cost"), measured_dense_ms=rows.get("dense"),
                   measured_pruned_ms=rows.get("pruned"))
        for name in ("dense", "pruned"):
            pred, meas = out[f"predicted_{name}_ms"], out[f"measured_{name}_ms"]
            out[f"prediction_error_{name}"] = (pred - meas) / meas if pred and meas else None
    return out


def _noise_off(models: dict, name: str) -> dict:
    """natural / strong PGD / worst case of one model with the noise off (the deployed function)."""
    res = models.get(name, {})
    res = res.get("noise_off") or res.get("stochastic") or {}
    return {"natural": res.get("natural"), "pgd": res.get("attacks", {}).get("pgd", {}).get("accuracy"),
            "pgd_key": res.get("attacks", {}).get("pgd", {}).get("key"), "worst_case": res.get("worst_case")}


def baseline_summary(ev: dict, headline: dict, baseline: dict, cfg: dict) -> dict:
    """Dense, pruned and the thin network trained from scratch side by side (noise off, best latency at the
    headline setting), and which wins at (nearly) equal latency."""
    thin_models = baseline["robustness"]["models"]
    rows = [{"model": "dense", **_noise_off(ev["models"], "dense"), "p50_ms": headline["dense_p50_ms"]},
            {"model": "pruned", **_noise_off(ev["models"], "pruned"), "p50_ms": headline["pruned_p50_ms"]},
            {"model": "thin from scratch", **_noise_off(thin_models, "dense"),
             "p50_ms": baseline["headline"]["dense_p50_ms"]}]
    pruned, thin = rows[1], rows[2]
    delta = {k: (pruned[k] - thin[k]) if pruned[k] is not None and thin[k] is not None else None
             for k in ("natural", "pgd", "worst_case")}
    winner = None
    if delta["pgd"] is not None and delta["natural"] is not None:
        winner = "pruned" if delta["pgd"] + delta["natural"] > 0 else "thin from scratch"
    return {"rows": rows, "pruned_minus_thin": delta, "winner": winner, "images": ev["images"],
            "thin_epochs": baseline.get("train_epochs"), "run": baseline["run"]}


def mobile_summary(st: dict, bench: dict) -> dict | None:
    """The mobile stage's .ort files: size, NNAPI / CoreML verdicts, agreement with their .onnx (mobile stage) and
    with the host on every device (bench), host p50 at batch 1, 1 thread, level all beside their .onnx's."""
    entry = st.get("mobile", {})
    mobile = entry.get("metrics", {})
    if not mobile.get("enabled"):
        return None
    devices = bench.get("devices", {})
    host = next((d for d, v in devices.items() if v.get("kind") == "host" and "error" not in v), None)

    def p50(artifact):
        lat = [r["p50_ms"] for r in bench.get("latency_all", []) if r["device"] == host and r["artifact"] == artifact
               and r["batch"] == 1 and r["threads"] == 1 and r["graph_optimization"] == "all"]
        return lat[0] if lat else None

    rows = []
    for name, m in mobile.get("artifacts", {}).items():
        label = m["file"]
        rows.append({
            "artifact": label, "onnx_artifact": name, "model": m["model"], "variant": m["variant"],
            "path": entry.get("outputs", {}).get(ort_key(name), {}).get("path"),
            "bytes": m["bytes"], "onnx_bytes": m["source_bytes"],
            "nnapi": m["nnapi"], "coreml": m["coreml"], "coreml_format": m["usability"]["coreml_format"],
            "fixed_shape_needed": m["usability"]["fixed_shape_needed"], "usability": m["usability"]["detail"],
            "top1_agreement": m["top1_agreement"], "max_abs_logit_diff": m["max_abs_logit_diff"],
            "images": m["images"],
            "agreement_with_host": {d: v["artifacts"][label]["agreement_with_host"] for d, v in devices.items()
                                    if "error" not in v and "agreement_with_host" in v["artifacts"].get(label, {})},
            "host_p50_ms_b1_t1": p50(label) if host else None,
            "onnx_host_p50_ms_b1_t1": p50(name) if host else None})
    ops = mobile.get("required_operators")
    return {"optimization_level": mobile.get("optimization_level"),
            "optimization_style": mobile.get("optimization_style"),
            "target_platform": mobile.get("target_platform"),
            "required_operators": {**ops, "path": entry.get("outputs", {}).get(REQUIRED_OPERATORS, {}).get("path")}
            if ops else None,
            "artifacts": rows, "skipped": mobile.get("skipped", {})}


def variant_rows(st: dict, ev: dict, transfer: dict, bench: dict) -> list[dict]:
    """One row per ONNX artifact: file, size, accuracy and robustness (white-box on its torch twin; onnxruntime on
    the twin's examples; int8: by transfer from its float model), and host latency at batch 1 / 1 thread."""
    out = []
    host = next((d for d, v in bench.get("devices", {}).items() if v.get("kind") == "host" and "error" not in v), None)
    for name, t in transfer["models"].items():
        model, variant, twin = t.get("model", name), t.get("variant", "deterministic"), t.get("twin_mode", "noise_off")
        stage = stage_of(variant)
        out_entry = st.get(stage, {}).get("outputs", {}).get(f"{name}_onnx", {})
        row = {"artifact": name, "model": model, "variant": variant, "onnx": out_entry.get("path"),
               "bytes": None, "natural_onnx": t["natural"], "twin_mode": twin}
        if host:
            a = bench["devices"][host]["artifacts"].get(name, {})
            row["bytes"] = a.get("bytes")
            lat = [r for r in bench.get("latency_all", []) if r["device"] == host and r["artifact"] == name
                   and r["batch"] == 1 and r["threads"] == 1 and r["graph_optimization"] == "all"]
            row["host_p50_ms_b1_t1"] = lat[0]["p50_ms"] if lat else None
        source = twin or "noise_off"   # int8: examples crafted on its float model, noise off
        qeval = st.get("qeval", {}).get("metrics", {}).get("models", {})   # quantized: attacked through the graph's twin
        row["whitebox_worst_case"] = (ev["models"].get(model, {}).get(twin, {}).get("worst_case") if twin
                                      else qeval.get(name, {}).get("worst_case"))
        crafted = t["crafted_on"].get(source, {})
        row["onnx_on_twin_examples"] = crafted
        row["onnx_worst_attack"] = min(crafted.values()) if crafted else None
        out.append(row)
    return out


def sanity_checks(models: list[dict], ev: dict, transfer: dict, num_classes: int = 10) -> list[dict]:
    """Checks every honest result passes; a failure is a red line in report.md, never a quiet number.

    - above chance: natural accuracy more than 3 binomial standard errors above 1/num_classes;
    - the attack orderings the eval stage checked per model and noise mode (eps 0 = natural, monotone in eps,
      strong <= IFGSM <= FGSM, EOT <= single sample, attacked <= natural);
    - ONNX on the examples crafted on torch: equal to torch with noise off, not below white-box otherwise."""
    out = []
    for m in models:
        acc, n = m["accuracy"], m["accuracy_images"]
        if "natural" in acc:
            chance = 100.0 / num_classes
            limit = chance + 300.0 * math.sqrt(chance / 100 * (1 - chance / 100) / max(n, 1))
            out.append({"model": m["variant"], "check": "above_chance", "ok": acc["natural"] > limit,
                        "detail": f"natural {acc['natural']:.2f}% vs chance {chance:.0f}% (+3 SE = {limit:.1f}% "
                                  f"on {n} images)"})
    for name, modes in ev["models"].items():
        for mode, res in modes.items():
            out += [{"model": f"{name}/{mode}", **c} for c in res.get("sanity", [])]
    for name, res in transfer["models"].items():
        out += [{"model": f"{name}.onnx", **c} for c in res.get("sanity", [])]
    return out


