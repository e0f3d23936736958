"""Your model, your data: the README's "Your own model and data" example, run exactly as written (a builder in a
module file of the user's folder, an .npz of uint8 images), and the same builder on an ImageFolder tree of PNGs --
train through bench, with the image size and class count taken from the data."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
PIPELINE = Path(sys.executable).parent / "pipeline"   # the console script: no '' on sys.path, unlike python -m


def readme_blocks() -> dict[str, str]:
    """The README section's code blocks, by the file name in their first line (``# my_cnn.py``)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Your own model and data"):]
    section = section[:section.index("\n## ", 5)]
    blocks = re.findall(r"```(?:python|toml)\n# (\S+)\n(.*?)```", section, flags=re.S)
    return {name: f"# {name}\n{body}" for name, body in blocks}


def run(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(PIPELINE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def check_finished(out: Path, proc, classes: int, shape):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    arch = json.loads((out / "train" / "model.json").read_text())
    assert arch["arch"] == "my_cnn:small_cnn" and arch["kwargs"] == {"width": 16, "num_classes": classes}
    assert (out / "export" / "dense.onnx").is_file() and (out / "export" / "pruned.onnx").is_file()
    import onnx

    graph = onnx.load(out / "export" / "pruned.onnx").graph
    dims = [d.dim_value or d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == list(shape)
    assert [d.dim_value for d in graph.output[0].type.tensor_type.shape.dim][1:] == [classes]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["surgery"]["metrics"]["removed_fraction"] == 1.0
    assert manifest["stages"]["bench"]["status"] == "done"
    assert {m["variant"] for m in report["models"]} >= {"dense", "pruned"}
    return report


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("own")
    blocks = readme_blocks()
    assert set(blocks) == {"my_cnn.py", "make_data.py", "my_config.toml"}, set(blocks)
    for name, body in blocks.items():
        (folder / name).write_text(body)
    subprocess.run([sys.executable, "make_data.py"], cwd=folder, check=True)
    return folder, run(["run", "--config", "my_config.toml", "--out", "runs/my-cnn"], folder)


def test_the_readme_example_runs_as_written(readme_run):
    folder, proc = readme_run
    report = check_finished(folder / "runs" / "my-cnn", proc, classes=3, shape=(3, 16, 16))
    # the made-up classes (a brighter channel each) are learnable: the report opens without a red line
    assert report["sanity_failures"] == 0, report["sanity"]
    assert "3 classes (npz)" in proc.stdout


def test_the_same_builder_on_an_image_folder(readme_run, tmp_path):
    from PIL import Image

    folder, _ = readme_run
    rng = np.random.default_rng(1)
    for split, n in (("train", 40), ("test", 12)):
        for cls in ("cat", "dog", "fox"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                    tmp_path / "imgs" / split / cls / f"{i}.png")
    cfg = (folder / "my_config.toml").read_text().replace('dataset = "npz"', 'dataset = "imagefolder"').replace(
        'root = "my_data.npz"', f'root = "{tmp_path / "imgs"}"\nimage_size = 16').replace("val_size = 80", "val_size = 24")
    (folder / "folder_config.toml").write_text(cfg)
    out = tmp_path / "run"
    proc = run(["run", "--config", "folder_config.toml", "--out", str(out)], folder)
    check_finished(out, proc, classes=3, shape=(3, 16, 16))
    import onnx

    props = {p.key: p.value for p in onnx.load(out / "export" / "dense.onnx").metadata_props}
    assert json.loads(props["labels"]) == ["cat", "dog", "fox"]   # the folders' names, in order


def test_mobilenet_v2_through_the_whole_chain_on_cifar10(tmp_path, cifar_root):
    """The smoke budget with the registry's MobileNetV2 on real CIFAR-10: coupled groups across inverted residuals
    and depthwise convs, a MAC budget met, surgery removing every zero channel exactly, ONNX parity, bench."""
    out = tmp_path / "mnv2"
    sets = ["model.arch=mobilenet_v2_cifar", "model.ensemble=1", "model.noise_coef=0", "prune.groups=coupled",
            "prune.budget=macs", "prune.target=2", "train.epochs=1", "prune.epochs=1", "data.train_subset=256",
            "data.test_subset=64", 'eval.attacks=["fgsm","pgd"]', "eval.pgd_steps=2", "eval.pgd_restarts=1",
            "eval.sweep_steps=1", 'export.noise_variants=["deterministic"]', "quantize.calibration_images=16",
            "bench.threads=[1]", "bench.batches=[1]", "bench.runs=20", 'bench.optimizations=["all"]']
    proc = run(["run", "--config", str(REPO / "configs" / "smoke.toml"), "--out", str(out),
                *[a for s in sets for a in ("--set", s)]], REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    surgery = stages["surgery"]["metrics"]
    assert surgery["removed_fraction"] == 1.0 and surgery["max_abs_diff"] <= 1e-4
    assert surgery["macs_before"] / surgery["macs_after"] >= 2.0 * 0.99   # the budget, counted on the real graph
    assert stages["export"]["metrics"]["pruned"]["parity_max_abs_diff"] <= 1e-4
    arch = json.loads((out / "surgery" / "model.json").read_text())
    assert arch["arch"] == "mobilenet_v2_cifar" and arch["shapes"]   # pruned widths recorded
    # depthwise convs stay depthwise after surgery: their groups follow their (pruned) channels
    import torch
    from pipeline.run.checkpoints import load_model

    pruned = load_model(out / "surgery" / "model.pt", out / "surgery" / "model.json")
    dw = [m for m in pruned.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert dw and all(m.groups == m.in_channels == m.out_channels for m in dw)
