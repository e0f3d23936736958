"""The real CLI on configs/smoke.toml: every stage, the report, resume, re-evaluation, and a prune-only rerun.

One module-scoped fixture runs the pipeline several times (fresh, identical rerun, ``--set prune.rgsm.lambda1``,
``pipeline eval``, coupled groups) and
keeps a snapshot of what the first run produced, so the tests below can be read in any order.
"""
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
STAGES = ("train", "prune", "surgery", "eval", "export", "quantize", "mobile", "transfer", "qeval", "bench")
# Every run also benches on a device that cannot be reached (nothing listens on port 1): its one-line error is
# recorded and the host's results are kept.
DEVICES = ('bench.devices=[{target="host"}, {target="ssh://nobody@127.0.0.1:1", name="board-down", '
           'timeout_s=30}]')
ONLY_DETERMINISTIC = ("--set", 'eval.noise_modes=["stochastic", "noise_off"]', "--set", 'export.noise_variants=["deterministic"]',
                      "--set", "quantize.enabled=false")
# the later runs check the runner, pruning and re-evaluation, not the attacks: two attacks, two radii
LIGHT_EVAL = ("--set", 'eval.attacks=["fgsm", "pgd"]', "--set", "eval.pgd_restarts=1",
              "--set", "eval.sweep_eps_255=[0, 8]")
ARTIFACTS = ["dense", "dense_per_sample", "dense_stochastic", "pruned", "pruned_per_sample", "pruned_stochastic"]
# the mobile stage's: every deterministic and int8 graph as .ort, benched as the artifact "<name>.ort"
ORT = ["dense.ort", "dense_int8.ort", "pruned.ort", "pruned_int8.ort"]


@dataclass
class Run:
    proc: subprocess.CompletedProcess


@dataclass
class Smoke:
    out: Path
    first: Run
    report: dict
    report_md: str
    manifest: dict
    onnx_files: list
    ort_files: list
    required_operators: str
    second: Run
    third: Run
    third_manifest: dict
    coupled: Run
    coupled_report: dict
    re_eval: Run
    re_eval_manifest: dict


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")   # tiny model: more threads only add contention
    return env


ROOT = REPO


def _cli(out: Path, *extra: str) -> Run:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--config", "configs/smoke.toml",
                           "--out", str(out), "--set", DEVICES, *extra], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    return Run(proc)


def _cli_eval(out: Path, *extra: str) -> Run:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "eval", "--run", str(out), *extra], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=600)
    return Run(proc)


def _explain(run: Run) -> str:
    return f"rc={run.proc.returncode}\nstdout:\n{run.proc.stdout[-3000:]}\nstderr:\n{run.proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def smoke(cifar_root, tmp_path_factory) -> Smoke:
    out = tmp_path_factory.mktemp("smoke") / "run"
    first = _cli(out)
    assert first.proc.returncode == 0, _explain(first)
    report = json.loads((out / "report.json").read_text())
    report_md = (out / "report.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    onnx_files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.onnx"))
    ort_files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.ort"))
    required_operators = (out / "mobile" / "required_operators.config").read_text()
    second = _cli(out)
    # the later runs test the runner, pruning and re-evaluation; the deployable variants were checked above
    third = _cli(out, "--set", "prune.rgsm.lambda1=1.0", *ONLY_DETERMINISTIC, *LIGHT_EVAL)
    third_manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    re_eval = _cli_eval(out, "--set", "eval.avg_passes=2")
    re_eval_manifest = json.loads((out / "manifest.json").read_text())
    coupled = _cli(out, "--set", "prune.groups=coupled", "--set", "prune.align=4", *ONLY_DETERMINISTIC, *LIGHT_EVAL)
    coupled_report = json.loads((out / "report.json").read_text()) if coupled.proc.returncode == 0 else {}
    return Smoke(out, first, report, report_md, manifest, onnx_files, ort_files, required_operators, second, third,
                 third_manifest, coupled, coupled_report, re_eval, re_eval_manifest)


def test_first_run_succeeds(smoke):
    assert smoke.first.proc.returncode == 0, _explain(smoke.first)
    for stage in STAGES:
        assert f"[{stage}] running" in smoke.first.proc.stdout.splitlines()
    assert "Traceback" not in smoke.first.proc.stderr


def test_onnx_files_one_per_variant(smoke):
    assert smoke.onnx_files == [f"export/{a}.onnx" for a in ARTIFACTS] + [
        "quantize/dense_int8.onnx", "quantize/pruned_int8.onnx"]


def test_unreachable_device_is_one_line_and_keeps_the_host(smoke):
    devices = smoke.report["devices"]
    err = devices["board-down"]["error"]
    assert "\n" not in err and "board-down" in err and "127.0.0.1" in err
    assert f"[bench] device board-down: FAILED: {err}" in smoke.first.proc.stdout
    host = devices["host"]
    assert "error" not in host and host["emulated"] is False
    assert {r["device"] for r in smoke.report["latency"]} == {"host"}
    assert "**failed**: " + err in smoke.report_md


def test_every_artifact_has_latency_accuracy_and_agreement(smoke):
    r = smoke.report
    onnx_arts = set(ARTIFACTS) | {"dense_int8", "pruned_int8"}
    arts = onnx_arts | set(ORT)
    rows = r["latency"]
    for row in rows:
        for field in ("device", "emulated", "runtime", "provider", "threads", "batch", "p50_ms", "p90_ms",
                      "p99_ms", "artifact", "variant"):
            assert field in row, field
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
    assert {row["artifact"] for row in rows} == arts
    host = r["devices"]["host"]["artifacts"]
    assert set(host) == arts
    for name, a in host.items():
        stage = "mobile" if name.endswith(".ort") else "quantize" if "int8" in name else "export"
        metrics = smoke.manifest["stages"][stage]["metrics"]
        m = metrics["artifacts"][name.removesuffix(".ort")] if stage == "mobile" else metrics[name]
        assert a["bytes"] == m["bytes"] > 0
        assert a["format"] == ("ort" if stage == "mobile" else "onnx")
        if a["variant"] in ("deterministic", "int8"):
            assert a["agreement_with_host"] == 100.0, name   # the same build on the same machine
        else:
            assert "agreement_with_host" not in a
    variants = {v["artifact"]: v for v in r["variants"]}
    assert set(variants) == onnx_arts
    # int8 has no eval-mode twin: its white-box worst case is the qeval stage's, through the graph's own torch twin
    assert variants["dense_int8"]["twin_mode"] is None
    qeval = smoke.manifest["stages"]["qeval"]["metrics"]["models"]["dense_int8"]
    assert variants["dense_int8"]["whitebox_worst_case"] == qeval["worst_case"] is not None
    assert variants["pruned_per_sample"]["twin_mode"] == "per_sample"
    # every noisy variant's share of latency, per setting; int8 change per setting
    assert {(x["model"], x["variant"]) for x in r["noise_overhead"]} == {
        (m, v) for m in ("dense", "pruned") for v in ("stochastic", "per_sample")}
    for x in r["noise_overhead"]:
        assert x["noise_share"] == pytest.approx((x["noisy_p50_ms"] - x["deterministic_p50_ms"]) / x["noisy_p50_ms"])
    assert {x["model"] for x in r["int8"]} == {"dense", "pruned"}
    for title in ("## Deployable variants", "## Devices", "## Latency per device", "## Noise overhead",
                  "## int8 vs float"):
        assert title in smoke.report_md, title
    assert "Emulated runs" not in smoke.report_md     # no emulated device in this run


def test_mobile_ort_files_config_verdicts_and_report_rows(smoke):
    assert smoke.ort_files == [f"mobile/{name}" for name in ORT]
    mobile = smoke.manifest["stages"]["mobile"]
    assert set(mobile["outputs"]) == {f"{n.removesuffix('.ort')}_ort" for n in ORT} | {"required_operators"}
    assert mobile["outputs"]["required_operators"]["path"] == "mobile/required_operators.config"
    # one combined config: every .ort file named, the float and the QDQ int8 ops listed
    config = smoke.required_operators
    assert all(f"# - {name}\n" in config for name in ORT)
    listed = {op for line in config.splitlines() if not line.startswith("#") for op in line.split(";")[2].split(",")}
    assert {"Conv", "Gemm", "QuantizeLinear", "DequantizeLinear", "QLinearConv"} <= listed
    r = smoke.report
    rows = {a["artifact"]: a for a in r["mobile"]["artifacts"]}
    assert list(rows) == ORT
    for name, a in rows.items():
        assert a["top1_agreement"] == 100.0 and a["images"] == 256, name   # the .ort computes its .onnx's logits
        assert a["max_abs_logit_diff"] < 1e-3 and a["nnapi"] in ("supported", "partial", "unsupported")
        assert a["agreement_with_host"] == {"host": 100.0}
        assert a["host_p50_ms_b1_t1"] > 0 and a["onnx_host_p50_ms_b1_t1"] > 0
        assert a["path"] == f"mobile/{name}" and a["bytes"] > 0 and a["onnx_artifact"] == name.removesuffix(".ort")
    ort_rows = [x for x in r["latency"] if x["artifact"].endswith(".ort")]
    assert {x["artifact"] for x in ort_rows} == set(ORT)
    assert all(x["format"] == "ort" and x["graph_optimization"] == "all" for x in ort_rows)
    assert {(x["model"], x["variant"]) for x in ort_rows} == {(m, v) for m in ("dense", "pruned")
                                                              for v in ("deterministic", "int8")}
    # the headline and the per-level tables compare the .onnx graphs only
    assert all(not x["artifact"].endswith(".ort") for m in r["models"] for x in m["latency"])
    assert all(x["format"] == "onnx" for m in r["models"] for x in m["latency"])
    md = smoke.report_md
    section = md.split("## Mobile (.ort)")[1].split("\n## ")[0]
    for name in ORT:
        assert f"| {name} | " in section and f"- {name}: NNAPI " in section
    assert "mobile/required_operators.config" in section


def test_per_sample_mode_is_evaluated_on_deployed_models_only(smoke):
    rob = smoke.report["robustness"]
    assert "per_sample" in rob["modes"]
    assert "per_sample" in rob["models"]["dense"] and "per_sample" in rob["models"]["pruned"]
    assert "per_sample" not in rob["models"]["masked"]
    assert "natural_per_sample" in smoke.report["models"][0]["accuracy"]


def test_manifest_all_stages_done(smoke):
    m = smoke.manifest
    assert set(STAGES) <= set(m["stages"])
    for stage in STAGES:
        assert m["stages"][stage]["status"] == "done", stage
    for key in ("config", "versions", "git_commit"):
        assert key in m
    assert m["config"]["name"] == "smoke"


def test_report_fields(smoke):
    r = smoke.report
    models = r["models"]
    assert [m["variant"] for m in models] == ["dense", "pruned"]
    for m in models:
        for field in ("name", "variant", "onnx", "params", "macs", "channel_sparsity", "weight_sparsity",
                      "accuracy", "latency", "onnx_params", "onnx_macs", "onnx_accuracy"):
            assert field in m, (m["variant"], field)
        assert m["name"] == f"smoke-{m['variant']}"
        assert m["onnx"] == f"export/{m['variant']}.onnx" and (smoke.out / m["onnx"]).is_file()
        assert isinstance(m["params"], int) and m["params"] > 0
        assert isinstance(m["macs"], int) and m["macs"] > 0
        assert 0.0 <= m["channel_sparsity"] <= 100.0 and 0.0 <= m["weight_sparsity"] <= 100.0
        acc = m["accuracy"]
        assert "natural" in acc
        # keys name the attack and its parameters (smoke.toml: PGD-10x2, IFGSM-10, apgd_steps 5)
        for key in ("fgsm[eps=0.031]", "ifgsm[eps=0.031,step=0.007,steps=10]",
                    "cw_paper[eps=0.031,c=10,kappa=0,lr=0.0006,steps=5]",
                    "pgd[eps=0.0313725,step=0.00784314,steps=10,restarts=2]",
                    "eot_pgd[eps=0.0313725,step=0.00784314,steps=10,eot_samples=2]",
                    # on the noisy model APGD averages its gradient over the noise (EOT), as EOT-PGD does
                    "apgd_ce[eps=0.0313725,steps=5,eot_samples=2]", "apgd_dlr[eps=0.0313725,steps=5,eot_samples=2]",
                    "apgd_ce[eps=0.0313725,steps=5]_noise_off", "worst_case",
                    "natural_noise_off", "ifgsm[eps=0.031,step=0.007,steps=10]_noise_off", "natural_avg4"):
            assert key in acc, (key, sorted(acc))
        assert not any(k.startswith("eot_pgd") and k.endswith("_noise_off") for k in acc)
        for v in acc.values():
            assert 0.0 <= v <= 100.0
        for mode in ("stochastic", "noise_off"):
            transfer = m["onnx_transfer"]["crafted_on"][mode]
            assert set(transfer) >= {"fgsm", "ifgsm", "cw_paper", "pgd", "apgd_ce", "apgd_dlr"}
        assert isinstance(m["latency"], list) and m["latency"]
        for lat in m["latency"]:
            for field in ("device", "runtime", "threads", "batch", "p50_ms", "p90_ms", "best"):
                assert field in lat, field
            assert 0 < lat["p50_ms"] <= lat["p90_ms"]
        # Default grid: batches 1 and 32 x threads 1 and all cores x every ORT optimisation level.
        all_cores = os.cpu_count()
        grid = {(b, t, lvl) for b in (1, 32) for t in (1, all_cores) for lvl in ("disable", "basic", "extended", "all")}
        assert {(x["batch"], x["threads"], x["graph_optimization"]) for x in m["latency"]} == grid
        assert len(m["latency"]) == len(grid)
        for b in (1, 32):
            for t in {1, all_cores}:
                rows = [x for x in m["latency"] if (x["batch"], x["threads"]) == (b, t)]
                best = [x for x in rows if x["best"]]
                assert len(best) == 1 and best[0]["p50_ms"] == min(x["p50_ms"] for x in rows)
    for field in ("max_abs_diff", "removed_channels", "zero_channels", "layers"):
        assert field in r["surgery"]
    # headline = dense-best / pruned-best at batch 1, 1 thread; efficiency = that / MAC reduction
    h = r["headline"]
    dense, pruned = (next(x for x in m["latency"] if x["best"] and x["batch"] == 1 and x["threads"] == 1)
                     for m in models)
    assert (h["batch"], h["threads"]) == (1, 1)
    assert h["speedup"] == pytest.approx(dense["p50_ms"] / pruned["p50_ms"])
    assert h["efficiency"] == pytest.approx(h["speedup"] * models[1]["macs"] / models[0]["macs"])
    for name in r["plots"].values():
        assert (smoke.out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # quality guards: counted in report.json, one red line each at the top of report.md
    assert r["sanity"] and r["sanity_failures"] == sum(not c["ok"] for c in r["sanity"])
    md = smoke.report_md
    assert md.count("SANITY CHECK FAILED") == r["sanity_failures"]
    checks = {c["check"] for c in r["sanity"]}
    assert {"eps0_equals_natural", "ifgsm_not_above_fgsm", "pgd_not_above_ifgsm", "apgd_ce_not_above_ifgsm",
            "eot_not_above_single_sample", "sweep_eps8_not_above_eps4", "onnx_pgd_matches_torch_noise_off",
            "onnx_pgd_transfer_not_below_whitebox"} <= checks
    rob = r["robustness"]
    assert set(rob["models"]) == {"dense", "masked", "pruned"}
    assert rob["models"]["masked"]["noise_off"] == {"same_as": "pruned"}
    assert rob["images_per_s"] > 0
    for title in ("the paper's columns", "strong attacks", "ONNX artifacts scored by transfer",
                  "A4 C&W (paper variant, weak)"):
        assert title in md, title
    assert "widths.png" in md and "accuracy_vs_latency" not in md and "accuracy_latency.png" in md


def test_dense_model_is_dense_and_pruned_is_smaller(smoke):
    dense, pruned = smoke.report["models"]
    assert dense["channel_sparsity"] == 0.0
    assert pruned["onnx_params"] < dense["onnx_params"]
    assert pruned["onnx_macs"] < dense["onnx_macs"]
    assert pruned["params"] < dense["params"] and pruned["macs"] < dense["macs"]
    s = smoke.report["surgery"]
    assert 0 < s["removed_channels"] <= s["zero_channels"]
    # pruned channel sparsity is the masked model's zero groups over all groups (118 for test_resnet En_2)
    assert s["total_channels"] == 2 * 59
    assert pruned["channel_sparsity"] == pytest.approx(100.0 * s["zero_channels"] / s["total_channels"])


def test_surgery_exact(smoke):
    assert smoke.report["surgery"]["max_abs_diff"] <= 1e-5


def test_onnx_accuracy_matches_torch(smoke):
    for m in smoke.report["models"]:
        oa = m["onnx_accuracy"]
        assert abs(oa["onnxruntime"] - oa["torch_noise_off"]) <= 0.5, m["variant"]
        assert oa["images"] == 256   # data.test_subset
        # the torch side of the ONNX comparison is the same evaluation as the report's noise-off accuracy
        if "natural_noise_off" in m["accuracy"]:
            assert oa["torch_noise_off"] == pytest.approx(m["accuracy"]["natural_noise_off"])


def test_surgery_checkpoint_loads_weights_only(smoke):
    state = torch.load(smoke.out / "surgery" / "model.pt", weights_only=True, map_location="cpu")
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    from pipeline.run.checkpoints import load_model
    model = load_model(smoke.out / "surgery" / "model.pt", smoke.out / "surgery" / "model.json").eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_identical_rerun_skips_everything_but_the_incomplete_bench(smoke):
    run = smoke.second
    assert run.proc.returncode == 0, _explain(run)
    lines = run.proc.stdout.splitlines()
    for stage in STAGES[:-1]:
        assert any(line.startswith(f"[{stage}] skipped") for line in lines), (stage, run.proc.stdout)
        assert f"[{stage}] running" not in lines
    # bench finished without the unreachable device, so a rerun retries it (the results stay in the report)
    assert smoke.manifest["stages"]["bench"]["incomplete"].startswith("1 device(s) failed; first: board-down")
    assert any(line.startswith("[bench] retrying: the last run was incomplete") for line in lines)
    assert "warning: device board-down gave no results" in run.proc.stderr


def test_prune_change_reruns_from_prune(smoke):
    run = smoke.third
    assert run.proc.returncode == 0, _explain(run)
    lines = run.proc.stdout.splitlines()
    assert any(line.startswith("[train] skipped") for line in lines), run.proc.stdout
    for stage in ("prune", "surgery", "export", "bench"):
        assert f"[{stage}] running" in lines, (stage, run.proc.stdout)
    m = smoke.third_manifest
    assert m["config"]["prune"]["rgsm"]["lambda1"] == 1.0
    assert all(m["stages"][s]["status"] == "done" for s in STAGES)
    # train's entry is untouched; prune's key changed
    assert m["stages"]["train"]["key"] == smoke.manifest["stages"]["train"]["key"]
    assert m["stages"]["prune"]["key"] != smoke.manifest["stages"]["prune"]["key"]
    assert m["stages"]["prune"]["metrics"]["threshold"] == pytest.approx(2.0 ** 0.5)


def test_coupled_groups_remove_every_zero_channel(smoke):
    run = smoke.coupled
    assert run.proc.returncode == 0, _explain(run)
    assert any(line.startswith("[train] skipped") for line in run.proc.stdout.splitlines())
    r = smoke.coupled_report
    assert r["prune"] == {**r["prune"], "groups": "coupled", "align": 4}
    s = r["surgery"]
    assert s["zero_channels"] > 0 and s["removed_fraction"] == 1.0 and s["kept_for_shape"] == 0
    assert s["max_abs_diff"] <= 1e-5
    # every pruned conv width is the dense width or a nonzero multiple of the alignment
    for layer in s["layers"]:
        for dense, pruned in ((layer["in_dense"], layer["in_pruned"]), (layer["out_dense"], layer["out_pruned"])):
            if layer["name"].endswith("conv1") and dense == 3:
                assert pruned == 3                                  # the RGB input is never touched
            assert pruned == dense or (pruned % 4 == 0 and pruned >= 4), layer
    assert any(x["out_pruned"] < x["out_dense"] for x in s["layers"])
    out_pruned = {x["name"]: x["out_pruned"] for x in s["layers"]}
    assert r["prune"]["family_widths"] and all(out_pruned[name] == kept
                                               for name, kept in r["prune"]["family_widths"].items())
    for name in r["plots"].values():
        assert (smoke.out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pipeline_eval_reevaluates_without_retraining(smoke):
    run = smoke.re_eval
    assert run.proc.returncode == 0, _explain(run)
    lines = run.proc.stdout.splitlines()
    for stage in ("train", "prune", "surgery", "export", "quantize"):
        assert any(line.startswith(f"[{stage}] skipped") for line in lines), (stage, run.proc.stdout)
    # bench: retried only because the unreachable device left it incomplete
    assert any(line.startswith(("[bench] skipped", "[bench] retrying")) for line in lines), run.proc.stdout
    for stage in ("eval", "transfer"):
        assert f"[{stage}] running" in lines, (stage, run.proc.stdout)
    before = smoke.third_manifest["stages"]["eval"]["metrics"]["models"]   # the run it re-evaluates
    after = smoke.re_eval_manifest["stages"]["eval"]["metrics"]["models"]
    assert "natural_avg2" in after["pruned"]["stochastic"]
    # the deterministic rows are reproduced exactly
    for name in ("dense", "pruned"):
        b, a = before[name]["noise_off"], after[name]["noise_off"]
        assert a["natural"] == b["natural"]
        assert {k: v["accuracy"] for k, v in a["attacks"].items()} == {k: v["accuracy"] for k, v in b["attacks"].items()}


def test_pipeline_eval_refuses_settings_that_would_retrain(smoke, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "eval", "--run", str(smoke.out), "--set",
                           "prune.rgsm.lambda1=0.5"], capture_output=True, text=True, cwd=ROOT, env=_env())
    assert proc.returncode == 2 and "only changes eval.*" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "eval", "--run", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, env=_env())
    assert proc.returncode == 2 and "no finished run here" in proc.stderr
