"""report.md: the run's headline, tables (the paper's columns, strong attacks, transfer, devices, latency, surgery)
and sanity lines, rendered from report.json."""
from __future__ import annotations

from ..catalog.attacks import ATTACKS, names
from .format import fmt as _fmt
from .quantized import quantized_lines


def _budget_lines(report: dict) -> list[str]:
    b = report.get("budget")
    if not b:
        return []
    ratio = b.get("cost_ratio")
    line = (f"**Budget**: {b['kind']} {b['target']:g}x less than dense (at most {b['limit']:.4g}, dense "
            f"{b['dense']:.4g}); the final layout costs {b.get(b['kind'] + '_cost', float('nan')):.4g} "
            f"({ratio:.2f}x less by the cost model); measured best-vs-best speed-up {b['measured_speedup']:.2f}x.")
    if b["kind"] == "latency":
        err = b.get("prediction_error_pruned")
        line += (f" Latency model on {b['device']} (level all, batch 1, 1 thread): dense predicted "
                 f"{b['predicted_dense_ms']:.3f} ms vs measured {_fmt(b.get('measured_dense_ms'), 3)} ms, pruned "
                 f"predicted {_fmt(b.get('predicted_pruned_ms'), 3)} ms vs measured "
                 f"{_fmt(b.get('measured_pruned_ms'), 3)} ms"
                 + (f" ({100 * err:+.1f} %)." if err is not None else "."))
    return [line, ""]


def _baseline_lines(report: dict) -> list[str]:
    b = report.get("baseline")
    if not b:
        return []
    key = next((r["pgd_key"] for r in b["rows"] if r.get("pgd_key")), "pgd")
    lines = [f"**Pruned vs the same widths trained from scratch** (`pipeline baseline`, {b['thin_epochs']} epochs; "
             f"noise off, {b['images']} test images; best level at batch 1, 1 thread):", "",
             f"| model | natural (%) | `{key}` (%) | worst case (%) | p50 (ms) |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {_fmt(r['natural'])} | {_fmt(r['pgd'])} | {_fmt(r['worst_case'])} | "
              f"{_fmt(r['p50_ms'], 3)} |" for r in b["rows"]]
    d = b["pruned_minus_thin"]
    if b["winner"]:
        lines += ["", f"Pruned minus thin: natural {d['natural']:+.2f}, PGD {d['pgd']:+.2f} points: "
                      + ("**pruning wins** here." if b["winner"] == "pruned" else
                         "**the thin network trained from scratch wins** here: for this budget, train it instead.")]
    return lines + [""]


def _paper_tables(report: dict) -> list[str]:
    """The paper's A1-A4 table (its columns, its attack constants) and the strong-attack table."""
    rob = report["robustness"]
    atk = rob["attacks"]
    paper_cols = [("A1 natural", None), *((ATTACKS[k].meta["column"], k) for k in names("paper"))]
    strong_cols = [(k, k) for k in names("strong") if k in atk]
    mode_label = {"stochastic": "noise on, 1 pass (paper)", "noise_off": "noise off (= ONNX)",
                  "per_sample": "noise on, std per image"}
    cascade = rob.get("mode") == "cascade"
    lines = ["", f"## Robustness: the paper's columns ({rob['images']} test images)", "",
             "Attack parameters: " + "; ".join(f"`{atk[k]['key']}`" for _, k in paper_cols if k in atk) + "."
             + (" **Cascade**: each column is robust after that attack *and every cheaper one before it* (see the "
                "strong attacks below), not the paper's stand-alone column; `eval.mode = \"full\"` gives those."
                if cascade else ""), "",
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
    order = ("" if not cascade else
             " **Cascade** (AutoAttack's convention): the attacks ran cheapest first, each only on the images no "
             "earlier attack broke, so every column here and above is *robust after this attack and all before "
             "it* (the columns only fall) and the worst case is exact; APGD and EOT attacks on a noisy model average "
             "their gradient over `eval.eot_samples` noise draws.")
    lines += ["", "## Robustness: strong attacks", "",
              "Attack parameters: " + "; ".join(f"`{atk[k]['key']}`" for _, k in strong_cols) + ". Worst case: "
              "an image counts as robust only if it survives every attack above." + order, "",
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
        scored = list(dict.fromkeys(k for res in rob["onnx_transfer"].values() for accs in res["crafted_on"].values()
                                    for k in accs))
        lines += ["", "## ONNX artifacts scored by transfer (onnxruntime on examples crafted on the torch model)", "",
                  "| artifact | crafted on | natural | " + " | ".join(scored) + " |",
                  "|---|---|---:|" + "---:|" * len(scored)]
        for name, res in rob["onnx_transfer"].items():
            for mode, accs in res["crafted_on"].items():
                lines.append(f"| {name}.onnx | torch, {mode_label.get(mode, mode)} | {_fmt(res['natural'])} | "
                             + " | ".join(_fmt(accs.get(k)) if k in accs else "–" for k in scored) + " |")
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
    lines[-2:-2] = _budget_lines(report) + _baseline_lines(report)
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
    lines += quantized_lines(report)
    lines += _mobile_lines(report)
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
              "(noise off)." + (f" Residual branches removed whole (depth pruning): "
                                f"{', '.join(s['removed_branches'])}." if s.get("removed_branches") else "")
              + (f" The pruned network was then fine-tuned for {report['finetune']['epochs']} epoch(s)."
                 if report.get("finetune", {}).get("epochs") else ""),
              "", f"![per-layer widths]({report['plots']['widths']})", "",
              "| layer | in: dense → pruned | out: dense → pruned |", "|---|---:|---:|"]
    lines += [f"| {r['name']} | {r['in_dense']} → {r['in_pruned']} | {r['out_dense']} → {r['out_pruned']} |"
              for r in s["layers"]]
    lines += ["", "## Accuracy vs latency", "", f"![accuracy vs latency]({report['plots']['accuracy_latency']})", "",
              f"Accuracy on {dense['accuracy_images']} test images. "
              + " ".join(f"{k}: {v}." for k, v in report["notes"].items()), ""]
    return "\n".join(lines)


def _mobile_lines(report: dict) -> list[str]:
    """The .ort files: size, NNAPI / CoreML verdicts, agreement with their .onnx, host latency beside the .onnx's."""
    mob = report.get("mobile")
    if not mob or not mob.get("artifacts"):
        return []
    ops = mob.get("required_operators") or {}
    verdict = lambda a, ep: a[ep] + (" †" if a["fixed_shape_needed"][ep] else "")  # noqa: E731
    lines = ["", "## Mobile (.ort)", "",
             f"onnxruntime's mobile format, optimised ahead of time (style {mob['optimization_style']}, level "
             f"{mob['optimization_level']}, target {mob['target_platform']})"
             + (f"; `{ops['path']}` lists the {ops['count']} op(s) a reduced onnxruntime build needs for all of them"
                if ops.get("path") else "")
             + ". NNAPI / CoreML: onnxruntime's usability checker, by op type; † = only once the batch dimension is "
               "fixed. Agreement: top-1 of the .ort against its .onnx.", "",
             "| artifact | size (kB) | .onnx size (kB) | NNAPI | CoreML | agreement with .onnx (%) | max abs Δ logits "
             "| host p50 batch 1, 1 thread: .ort / .onnx (ms) |", "|---|---:|---:|---|---|---:|---:|---:|"]
    for a in mob["artifacts"]:
        lines.append(f"| {a['artifact']} | {a['bytes'] / 1e3:.0f} | {a['onnx_bytes'] / 1e3:.0f} | "
                     f"{verdict(a, 'nnapi')} | {verdict(a, 'coreml')} ({a['coreml_format']}) | "
                     f"{_fmt(a['top1_agreement'])} of {a['images']} | {a['max_abs_logit_diff']:.1e} | "
                     f"{_fmt(a.get('host_p50_ms_b1_t1'), 3)} / {_fmt(a.get('onnx_host_p50_ms_b1_t1'), 3)} |")
    lines += ["", *(f"- {a['artifact']}: {a['usability']}" for a in mob["artifacts"])]
    lines += [f"- {name}.onnx: {why}" for name, why in mob.get("skipped", {}).items()]
    return lines


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
                  "quantized, .ort) | status |", "|---|---|---|---|---|---|"]
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


