"""report.json / report.md (+ two PNG plots): one entry per ONNX artifact, dense next to pruned."""
from __future__ import annotations

import math
from pathlib import Path

from .runio import atomic_write_bytes, atomic_write_text, write_json

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


def build_report(manifest: dict) -> dict:
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
    sanity = sanity_checks(models, ev, transfer)
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
        "surgery": {k: surgery[k] for k in ("max_abs_diff", "removed_channels", "zero_channels", "total_channels",
                                            "removed_fraction", "kept_for_shape", "layers")},
        "speedup": speedup,
        "headline": headline,
        "profile": bench.get("profile", {}),
        "latency": bench.get("latency_all", []),
        "devices": bench.get("devices", {}),
        "variants": variant_rows(st, ev, transfer, bench),
        "noise_overhead": bench.get("noise_overhead", []),
        "int8": bench.get("int8", []),
        "robustness": {"images": ev["images"], "modes": ev["modes"], "models": ev["models"],
                       "attacks": ev["attacks"], "seconds": ev["seconds"], "images_per_s": ev["images_per_s"],
                       "onnx_transfer": transfer["models"]},
        "paper": {k: v for k, v in cfg.get("paper", {}).items() if v not in (None, "")},
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
            "pruned_accuracy": "measured on the masked model before surgery (surgery is exact with noise off)",
            "latency": "every onnxruntime graph optimisation level is timed, interleaved; 'best' marks each "
                       "artifact's fastest level per batch/threads, and speed-up = dense-best / pruned-best. "
                       "Level 'all' includes the NCHWc layout, which pads channel counts to the SIMD block "
                       "(8/16), so unaligned pruned widths keep the padded cost there",
            "efficiency": "latency speed-up / MAC reduction (MACs: torch-pruning count, noise off)",
            "sparsity": "conv weights only, all members, in every denominator (BN, biases and the classifier are "
                        "never counted). channel_sparsity: input-channel groups with l2 norm < 1e-15 (the paper's "
                        "Ch. Sp.); channel_weight_sparsity: weights inside those groups (the reference code's "
                        "'weight sparsity', e.g. 10.917 % for its 25.33 % ResNet20); weight_sparsity: exactly zero "
                        "weights (the paper's unstructured 'Sp.')",
        },
    }


def variant_rows(st: dict, ev: dict, transfer: dict, bench: dict) -> list[dict]:
    """One row per ONNX artifact: file, size, accuracy and robustness (white-box on its torch twin; onnxruntime on
    the twin's examples; int8: by transfer from its float model), and host latency at batch 1 / 1 thread."""
    out = []
    host = next((d for d, v in bench.get("devices", {}).items() if v.get("kind") == "host" and "error" not in v), None)
    for name, t in transfer["models"].items():
        model, variant, twin = t.get("model", name), t.get("variant", "deterministic"), t.get("twin_mode", "noise_off")
        stage = "quantize" if variant == "int8" else "export"
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
        row["whitebox_worst_case"] = ev["models"].get(model, {}).get(twin, {}).get("worst_case") if twin else None
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


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def _deployed_accuracy(model: dict, report: dict) -> dict[str, float]:
    """Natural and strongest-attack (worst case) accuracy of the function the ONNX graph computes (noise off)."""
    res = report["robustness"]["models"].get(model["variant"], {})
    res = res.get("noise_off") or res.get("stochastic") or {}
    out = {"natural": res["natural"]} if "natural" in res else {}
    if "worst_case" in res:
        out["worst case"] = res["worst_case"]
    return out


def _paper_tables(report: dict) -> list[str]:
    """The paper's A1-A4 table (its columns, its attack constants) and the strong-attack table."""
    rob = report["robustness"]
    atk = rob["attacks"]
    paper_cols = [("A1 natural", None), ("A2 FGSM", "fgsm"), ("A3 IFGSM", "ifgsm"), ("A4 C&W (paper variant, weak)",
                                                                                     "cw_paper")]
    strong_cols = [(k, k) for k in ("pgd", "eot_pgd", "apgd_ce", "apgd_dlr") if k in atk]
    mode_label = {"stochastic": "noise on, 1 pass (paper)", "noise_off": "noise off (= ONNX)",
                  "per_sample": "noise on, std per image"}
    lines = ["", f"## Robustness: the paper's columns ({rob['images']} test images)", "",
             "Attack parameters: " + "; ".join(f"`{atk[k]['key']}`" for _, k in paper_cols if k in atk) + ".", "",
             "| model | mode | " + " | ".join(c for c, _ in paper_cols) + " |",
             "|---|---|" + "---:|" * len(paper_cols)]

    def cell(res, k, field="accuracy"):
        """``field`` "accuracy", or "avgK" for the softmax of K passes."""
        if k is None:
            return _fmt(res["natural"]) if field == "accuracy" else _fmt(res.get(f"natural_{field}"))
        row = res["attacks"].get(k)
        return _fmt(row.get(field if field == "accuracy" else f"accuracy_{field}")) if row else "–"

    for name, modes in rob["models"].items():
        for mode, res in modes.items():
            if "same_as" in res:
                lines.append(f"| {name} | {mode_label.get(mode, mode)} | = {res['same_as']} (surgery is exact) |"
                             + " |" * (len(paper_cols) - 1))
                continue
            lines.append(f"| {name} | {mode_label.get(mode, mode)} | "
                         + " | ".join(cell(res, k) for _, k in paper_cols) + " |")
            avg = next((k.removeprefix("natural_") for k in res if k.startswith("natural_avg")), None)
            if avg:
                lines.append(f"| {name} | noise on, softmax of {avg.removeprefix('avg')} passes | "
                             + " | ".join(cell(res, k, avg) for _, k in paper_cols) + " |")
    paper = report.get("paper", {})
    if any(k in paper for k in ("a1_natural", "a2_fgsm", "a3_ifgsm20", "a4_cw")):
        lines.append(f"| paper: {paper.get('row', '')} | as published | "
                     + " | ".join(_fmt(paper.get(k)) if k in paper else "–"
                                  for k in ("a1_natural", "a2_fgsm", "a3_ifgsm20", "a4_cw")) + " |")
    lines += ["", "## Robustness: strong attacks", "",
              "Attack parameters: " + "; ".join(f"`{atk[k]['key']}`" for _, k in strong_cols) + ". Worst case: "
              "an image counts as robust only if it survives every attack above.", "",
              "| model | mode | " + " | ".join(c for c, _ in strong_cols) + " | worst case | seconds |",
              "|---|---|" + "---:|" * (len(strong_cols) + 2)]
    for name, modes in rob["models"].items():
        for mode, res in modes.items():
            if "same_as" in res:
                continue
            lines.append(f"| {name} | {mode_label.get(mode, mode)} | "
                         + " | ".join(cell(res, k) for _, k in strong_cols)
                         + f" | {_fmt(res.get('worst_case'))} | {res.get('seconds')} |")
    if rob["onnx_transfer"]:
        names = list(atk)
        lines += ["", "## ONNX artifacts scored by transfer (onnxruntime on examples crafted on the torch model)", "",
                  "| artifact | crafted on | natural | " + " | ".join(names) + " |",
                  "|---|---|---:|" + "---:|" * len(names)]
        for name, res in rob["onnx_transfer"].items():
            for mode, accs in res["crafted_on"].items():
                lines.append(f"| {name}.onnx | torch, {mode_label.get(mode, mode)} | {_fmt(res['natural'])} | "
                             + " | ".join(_fmt(accs.get(k)) if k in accs else "–" for k in names) + " |")
    lines += ["", f"Evaluation took {rob['seconds']} s: {rob['images_per_s']} images/s, counting one image through "
                  "every attack and check of one model in one mode (per-attack times: report.json `robustness`). "
                  "The worst case of a stochastic model also takes the minimum over its evaluation noise, so it "
                  "sits lower than the noise-free union of the attacks would."]
    return lines


def render_markdown(report: dict) -> str:
    dense, pruned = report["models"]
    h, s, pr = report["headline"], report["surgery"], report["prune"]
    rows = [("params", "params"), ("MACs", "macs"), ("ONNX params", "onnx_params"), ("ONNX MACs", "onnx_macs"),
            ("channel sparsity (%)", "channel_sparsity"),
            ("weight sparsity induced by zero channels (%)", "channel_weight_sparsity"),
            ("weight sparsity, exact zeros (%)", "weight_sparsity")]
    lines = [f"# Run `{report['run']}`", ""]
    lines += [f"> **SANITY CHECK FAILED** ({c['model']}, {c['check']}): {c['detail']}" for c in report["sanity"]
              if not c["ok"]]
    lines += ["" if report["sanity_failures"] else "All sanity checks passed (report.json `sanity`).", "",
              f"commit `{report['git_commit']}`", "",
             f"**Speed-up {h['speedup']:.2f}x** (dense-best {h['dense_p50_ms']:.3f} ms, ORT {h['dense_level']} ÷ "
             f"pruned-best {h['pruned_p50_ms']:.3f} ms, ORT {h['pruned_level']}; batch {h['batch']}, "
             f"{h['threads']} thread(s)) for a **{h['mac_reduction']:.2f}x** MAC reduction: efficiency "
             f"**{h['efficiency']:.2f}**. Pruning: {pr.get('method', 'rgsm')}"
             + (f", groups {pr['groups']}, widths aligned to {pr['align']}." if pr.get("method", "rgsm") == "rgsm"
                else "."), "",
             "| | dense | pruned |", "|---|---:|---:|"]
    lines += [f"| {label} | {_fmt(dense.get(k))} | {_fmt(pruned.get(k))} |" for label, k in rows]
    paper = report.get("paper", {})
    for label, k in (("paper's channel sparsity (%)", "channel_sparsity"), ("paper's weight sparsity (%)",
                                                                           "weight_sparsity")):
        if k in paper:
            lines.append(f"| {label}: {paper.get('row', '')} | – | {_fmt(paper[k])} |")
    before = pr.get("before_final_projection")
    if before:
        lines.append(f"| before ADMM's final projection (the reference never projects): channel / exact weight "
                     f"sparsity (%) | – | {_fmt(before['channel_sparsity'])} / {_fmt(before['weight_sparsity'])} |")
    for k in ("natural", "natural_noise_off", "worst_case", "worst_case_noise_off"):
        if k in dense["accuracy"] or k in pruned["accuracy"]:
            lines.append(f"| accuracy {k} (%) | {_fmt(dense['accuracy'].get(k))} | "
                         f"{_fmt(pruned['accuracy'].get(k))} |")
    lines.append(f"| ONNX accuracy, onnxruntime (%) | {_fmt(dense['onnx_accuracy']['onnxruntime'])} "
                 f"| {_fmt(pruned['onnx_accuracy']['onnxruntime'])} |")
    lines.append(f"| same images, torch noise off (%) | {_fmt(dense['onnx_accuracy']['torch_noise_off'])} "
                 f"| {_fmt(pruned['onnx_accuracy']['torch_noise_off'])} |")
    lines.append(f"| ONNX file | `{dense['onnx']}` | `{pruned['onnx']}` |")
    lines += ["", "Sparsity counts conv weights only (all members); see report.json `notes.sparsity`."]

    lines += _paper_tables(report)
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

    lines += _device_sections(report)
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


def _device_sections(report: dict) -> list[str]:
    """Variants (size, accuracy, robustness, host latency), latency per device, emulated runs, noise and int8."""
    lines = []
    if report.get("variants"):
        lines += ["", "## Deployable variants", "",
                  "Robust: white-box worst case of the torch twin (the function the artifact computes; EOT for noisy "
                  "twins), and the worst attack's accuracy of onnxruntime on the twin's adversarial examples. int8 has "
                  "no twin: its robust column is by transfer from its float model (noise off).", "",
                  "| artifact | variant | size (kB) | natural, ORT (%) | robust: torch twin, worst case (%) | "
                  "robust: ORT on twin's examples (%) | host p50 batch 1, 1 thread (ms) |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for v in report["variants"]:
            kb = f"{v['bytes'] / 1e3:.0f}" if v.get("bytes") else "–"
            lines.append(f"| {v['artifact']} | {v['variant']} | {kb} | {_fmt(v['natural_onnx'])} | "
                         f"{_fmt(v.get('whitebox_worst_case'))} | {_fmt(v.get('onnx_worst_attack'))} | "
                         f"{_fmt(v.get('host_p50_ms_b1_t1'))} |")
    devices = report.get("devices", {})
    if devices:
        lines += ["", "## Devices", "", "| device | runtime | CPU | emulated | agreement with host (deterministic, "
                  "int8) | status |", "|---|---|---|---|---|---|"]
        for name, d in devices.items():
            if "error" in d:
                lines.append(f"| {name} | – | – | – | – | **failed**: {d['error']} |")
                continue
            rt = d["runtime"]
            agree = ", ".join(f"{k} {a['agreement_with_host']:.1f}% of {a['images']}"
                              for k, a in d["artifacts"].items() if "agreement_with_host" in a)
            emu = f"yes (QEMU_CPU={rt.get('qemu_cpu')})" if d["emulated"] else "no"
            lines.append(f"| {name} | onnxruntime {rt['onnxruntime']} ({rt['machine']}) | {rt['cpu']} | {emu} | "
                         f"{agree} | ok |")
    rows = report.get("latency", [])
    real = [r for r in rows if not r["emulated"] and r["graph_optimization"] == "all"]
    if real:
        arts = list(dict.fromkeys(r["artifact"] for r in real))
        settings = list(dict.fromkeys((r["device"], r["batch"], r["threads"]) for r in real))
        lines += ["", "## Latency per device (onnxruntime level all; p50 / p99 ms)", "",
                  "| device | batch | threads | " + " | ".join(arts) + " |", "|---|---:|---:|" + "---:|" * len(arts)]
        for dev, batch, threads in settings:
            cells = []
            for a in arts:
                r = next((r for r in real if (r["device"], r["batch"], r["threads"], r["artifact"]) ==
                          (dev, batch, threads, a)), None)
                cells.append(f"{r['p50_ms']:.3f} / {r['p99_ms']:.3f}" if r else "–")
            lines.append(f"| {dev} | {batch} | {threads} | " + " | ".join(cells) + " |")
        lines += ["", f"![latency per device and variant]({report['plots']['latency_devices']})", "",
                  f"![accuracy vs latency, every artifact]({report['plots']['pareto']})"]
    emu = [r for r in rows if r["emulated"]]
    if emu:
        lines += ["", "## Emulated runs: an instruction-cost proxy, NOT latency", "",
                  "The real aarch64 onnxruntime build ran under qemu-user: it proves the artifacts load and compute the "
                  "host's answers on ARM kernels. Its times measure the emulator (TCG cost follows executed "
                  "instructions; ratios between models do not carry over to ARM silicon either).", "",
                  "| device | artifact | batch | threads | emulated p50 (ms) |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['device']} | {r['artifact']} | {r['batch']} | {r['threads']} | {r['p50_ms']:.1f} |"
                  for r in emu if r["graph_optimization"] == "all"]
    noise = [r for r in report.get("noise_overhead", []) if not r["emulated"]]
    if noise:
        lines += ["", "## Noise overhead (share of the noisy variant's p50 spent on the noise, level all)", "",
                  "| device | model | variant | batch | threads | deterministic (ms) | noisy (ms) | noise share |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['device']} | {r['model']} | {r['variant']} | {r['batch']} | {r['threads']} | "
                  f"{r['deterministic_p50_ms']:.3f} | {r['noisy_p50_ms']:.3f} | {100 * r['noise_share']:.0f}% |"
                  for r in noise]
    prof = report.get("profile", {})
    rng_rows = []
    for name, p in prof.items():
        ops = p.get("ops", {})
        rng = sum(v["us_per_run"] for k, v in ops.items() if k.startswith("Random"))
        if rng:
            total = sum(v["us_per_run"] for v in ops.values())
            rng_rows.append(f"| {name} | {p['batch']} | {p['threads']} | {rng:.0f} | {total:.0f} | "
                            f"{100 * rng / total:.0f}% |")
    if rng_rows:
        lines += ["", "Where the noise's time goes (onnxruntime profiler, kernel time): the random-number kernel alone",
                  "", "| artifact | batch | threads | RandomNormal* µs/run | all kernels µs/run | share |",
                  "|---|---:|---:|---:|---:|---:|", *rng_rows]
    i8 = [r for r in report.get("int8", []) if not r["emulated"]]
    if i8:
        lines += ["", "## int8 vs float (same device, level all)", "",
                  "| device | model | batch | threads | float (ms) | int8 (ms) | latency ratio | size ratio | "
                  "accuracy change (pt) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['device']} | {r['model']} | {r['batch']} | {r['threads']} | {r['float_p50_ms']:.3f} | "
                  f"{r['int8_p50_ms']:.3f} | {r['latency_ratio']:.2f} | {r['size_ratio']:.2f} | "
                  f"{r['accuracy_change_pt']:+.2f} |" for r in i8]
    return lines


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both latency (lower) and accuracy (higher)."""
    keep = []
    for i, (lat, acc) in enumerate(points):
        if not any((l2 <= lat and a2 >= acc) and (l2 < lat or a2 > acc) for j, (l2, a2) in enumerate(points)
                   if j != i):
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


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
        for (kind, acc), marker in zip(_deployed_accuracy(model, report).items(), ("o", "^")):
            ax.scatter([best["p50_ms"]], [acc], color=color, marker=marker, s=60,
                       label=f"{model['variant']} {kind}")
            ax.annotate(f"{acc:.1f}", (best["p50_ms"], acc), textcoords="offset points", xytext=(6, 3), fontsize=8)
    ax.set_xlabel(f"p50 latency, best ORT level, batch {h['batch']}, {h['threads']} thread(s) (ms)")
    ax.set_ylabel("accuracy, noise off (%)")
    ax.set_title(f"{report['run']}: accuracy vs latency")
    ax.legend(fontsize=8)
    scatter = _png(fig)
    plt.close(fig)
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
    latency_devices = _png(fig)
    plt.close(fig)

    host = [r for r in rows if not r["emulated"] and report["devices"].get(r["device"], {}).get("kind") == "host"]
    pts, labels = [], []
    for v in report.get("variants", []):
        lat = next((r["p50_ms"] for r in host if r["artifact"] == v["artifact"]), None)
        if lat is None:
            continue
        # robust: the white-box worst case of the artifact's torch twin (the security claim); int8 has no twin,
        # so its point is onnxruntime on its float model's examples (transfer, an upper bound)
        robust = v.get("whitebox_worst_case")
        robust = v.get("onnx_worst_attack") if robust is None else robust
        for kind, acc in (("natural", v["natural_onnx"]), ("robust", robust)):
            if acc is not None:
                pts.append((lat, acc))
                labels.append((v["artifact"], kind))
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for kind, marker, color in (("natural", "o", "#9aa8b8"), ("robust", "^", "#2b6cb0")):
        idx = [i for i, (_, k) in enumerate(labels) if k == kind]
        ax.scatter([pts[i][0] for i in idx], [pts[i][1] for i in idx], marker=marker, color=color, label=kind)
        for i in idx:
            ax.annotate(labels[i][0], pts[i], textcoords="offset points", xytext=(4, 2), fontsize=7)
        front = pareto_front([pts[i] for i in idx])
        ax.plot([pts[idx[j]][0] for j in front], [pts[idx[j]][1] for j in front], color=color, lw=1, ls="--")
    ax.set_xlabel("host p50 latency, batch 1, 1 thread, ORT level all (ms)")
    ax.set_ylabel("accuracy (%): natural; robust = white-box worst case\n(int8: transfer from its float model)")
    ax.set_title(f"{report['run']}: accuracy vs latency (dashed: Pareto front)", fontsize=9)
    ax.legend(fontsize=8)
    pareto = _png(fig)
    plt.close(fig)
    return {PLOTS["latency_devices"]: latency_devices, PLOTS["pareto"]: pareto}


def write_report(run_dir: Path, manifest: dict) -> dict:
    report = build_report(manifest)
    for name, data in render_plots(report).items():
        atomic_write_bytes(run_dir / name, data)
    write_json(run_dir / "report.json", report)
    atomic_write_text(run_dir / "report.md", render_markdown(report))
    return report
