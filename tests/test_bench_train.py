import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.train.data import resolve_root

REPO = Path(__file__).resolve().parents[1]
# threads=1: a tiny model gains nothing from more threads and slows badly when the cores are shared.
SETS = ["model.arch=test_resnet", "train.attack.kind=fgsm_rs", "data.download=false", "device=cpu", "threads=1"]

# The reference loop reads torchvision's CIFAR-10 files, which cannot be faked (torchvision checks their MD5s).
pytestmark = pytest.mark.skipif(not (resolve_root("") / "cifar-10-batches-py").is_dir(),
                                reason="CIFAR-10 not found (set $PIPELINE_DATA_ROOT)")


@pytest.fixture
def keep_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # run_bench applies cfg.threads process-wide


def test_run_bench_reports_both_loops(capsys, keep_threads):
    from pipeline.tools.bench_train import run_bench

    cfg = load_config(None, [*SETS, "train.batch_size=64"])
    out = run_bench(cfg, images=128, workers=0)
    assert out["pipeline_images_per_s"] > 0 and out["reference_images_per_s"] > 0
    assert out["ratio"] == pytest.approx(out["pipeline_images_per_s"] / out["reference_images_per_s"])
    assert all(len(v) == 2 and min(v) > 0 for v in out["runs_images_per_s"].values())
    assert (out["model"], out["attack"], out["attack_steps"]) == ("test_resnet", "fgsm_rs", 1)
    assert (out["batch_size"], out["images"], out["workers"], out["device"]) == (64, 128, 0, "cpu")
    assert out["threads"] >= 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == out


def test_cli_bench_train():
    args = [a for s in SETS for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "bench-train", *args, "--images", "128",
                           "--workers", "0"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    assert "ratio pipeline/reference:" in proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ratio"] > 0


def test_rejects_bad_image_count():
    from pipeline.tools.bench_train import run_bench
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="--images"):
        run_bench(load_config(None, SETS), images=0, workers=0)


def test_variants_grid_times_every_variant_and_checks_the_grouped_net(capsys):
    """``bench-train --variants`` (the GPU probe of issue 10) runs on the CPU too: baseline first, one row per
    variant, and the grouped network's exactness check on the same device."""
    import json as _json

    from pipeline.cli import main

    assert main(["bench-train", "--variants", "--config", "configs/smoke.toml", "--batches", "4",
                 "--precisions", "fp32,bf16", "--impls", "members,grouped", "--channels-last", "false",
                 "--steps", "1", "--warmup", "0"]) == 0
    result = _json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = result["rows"]
    assert (rows[0]["batch"], rows[0]["precision"], rows[0]["impl"], rows[0]["vs_baseline"]) == (64, "fp32", "members", 1.0)
    assert {(r["precision"], r["impl"]) for r in rows[1:]} == {(p, i) for p in ("fp32", "bf16") for i in ("members", "grouped")}
    assert all(r["images_per_s"] > 0 for r in rows)
    assert not any(r["cuda_graphs"] for r in rows)   # off the GPU the default is eager only
    assert result["equivalence"]["max_abs_logits"] <= 1e-12 and result["equivalence"]["max_abs_stem_grad"] <= 1e-12


def test_variants_bad_list_is_one_line(capsys):
    from pipeline.cli import main

    assert main(["bench-train", "--variants", "--config", "configs/smoke.toml", "--precisions", "fp8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pipeline: error: --precisions: expected a comma-separated list from fp32, bf16, got ['fp8']"]


def test_variants_cuda_graphs_need_a_gpu(capsys):
    from pipeline.cli import main

    assert main(["bench-train", "--variants", "--config", "configs/smoke.toml", "--device", "cpu",
                 "--cuda-graphs", "true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pipeline: error: --cuda-graphs: true needs --device cuda (CUDA graphs), got device cpu"]


def test_variants_time_the_prune_step_with_its_sparsifier(capsys, monkeypatch):
    """--prune-step: every step of every variant (warm-up and timed) regularizes and pulls with the config's RGSM
    (paper groups), on the grouped network too."""
    import json as _json

    from pipeline.algorithms.rgsm import RGSM
    from pipeline.cli import main

    calls = []
    pull = RGSM.pull
    monkeypatch.setattr(RGSM, "pull", lambda self, lr: (calls.append(len(self.families)), pull(self, lr))[1])
    assert main(["bench-train", "--variants", "--prune-step", "--config", "configs/smoke.toml", "--batches", "4",
                 "--precisions", "fp32", "--impls", "members,grouped", "--channels-last", "false",
                 "--steps", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    result = _json.loads(out.strip().splitlines()[-1])
    assert result["step"].startswith("prune (rgsm") and "prune (rgsm, regularize + pull every step) step:" in out
    assert [r["impl"] for r in result["rows"]] == ["members", "members", "grouped"]   # baseline first
    # 3 steps per variant; the member list has a family per member conv, the grouped net one per grouped conv
    assert len(calls) == 9 and calls[0] == calls[3] == 2 * calls[6]
    assert main(["bench-train", "--variants", "--prune-step", "--config", "configs/smoke.toml",
                 "--set", "prune.method=admm"]) == 2
    assert "--prune-step: expected prune.method" in capsys.readouterr().err
