"""Every catalogued user mistake through the CLI entry point (``pipeline.cli.main``, what the ``pipeline``
script calls): exit 2 (1 only for the internal-error path), one line on stderr naming the problem, no traceback,
and a previous run folder left byte-for-byte unchanged. docs/errors.md documents each case by its id."""
import errno
import fcntl
import json
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline import cli

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke.toml")


def toml(tmp, text, name="cfg.toml"):
    p = tmp / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


def sets(*overrides):
    """A case that runs the smoke config with --set overrides against the previous run folder."""
    def setup(tmp, prev, mp):
        args = ["run", "--config", SMOKE, "--out", str(prev)]
        for o in overrides:
            args += ["--set", o]
        return args
    return setup


def config_file(text):
    def setup(tmp, prev, mp):
        return ["run", "--config", toml(tmp, text), "--out", str(prev)]
    return setup


def fresh_out_with(*overrides, data=None):
    """The smoke config into a fresh folder (data errors surface inside the first stage)."""
    def setup(tmp, prev, mp):
        args = ["run", "--config", SMOKE, "--out", str(tmp / "fresh")]
        if data:
            args += ["--set", f"data.root={json.dumps(str(data(tmp)))}", "--set", "data.download=false"]
        for o in overrides:
            args += ["--set", o]
        return args
    return setup


def empty_data(tmp):
    (tmp / "nodata").mkdir()
    return tmp / "nodata"


def damaged_data(tmp):
    import os

    src = Path(os.environ["PIPELINE_DATA_ROOT"]) / "cifar-10-batches-py"
    dst = tmp / "damaged" / "cifar-10-batches-py"
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name == "data_batch_2":
            (dst / f.name).write_bytes(f.read_bytes()[:5000])
        else:
            (dst / f.name).symlink_to(f)
    return tmp / "damaged"


def out_is_file(tmp, prev, mp):
    (tmp / "afile").write_text("x")
    return ["run", "--config", SMOKE, "--out", str(tmp / "afile")]


def out_below_file(tmp, prev, mp):
    (tmp / "afile").write_text("x")
    return ["run", "--config", SMOKE, "--out", str(tmp / "afile" / "run")]


def out_read_only(tmp, prev, mp):
    # root ignores permission bits, so the refusal the OS would give is injected where the folder is made
    def deny(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))
    mp.setattr(Path, "mkdir", deny)
    return ["run", "--config", SMOKE, "--out", str(tmp / "ro" / "run")]


def disk_full(tmp, prev, mp):
    def full(path, data, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    mp.setattr("pipeline.core.files.atomic_write_bytes", full)
    mp.setattr("pipeline.run.checkpoints.atomic_write_bytes", full)
    mp.setattr("pipeline.run.runner.write_json", lambda path, obj: full(path, b""))
    return ["run", "--config", SMOKE, "--out", str(tmp / "full")]


def damaged_manifest(content):
    def setup(tmp, prev, mp):
        import shutil

        other = tmp / "other"
        shutil.copytree(prev, other)
        (other / "manifest.json").write_bytes(content)
        return ["run", "--config", SMOKE, "--out", str(other)]
    return setup


HELD_LOCKS = []   # open lock files of the busy case, closed when the case ends


def locked(tmp, prev, mp):
    f = open(prev / ".lock", "a")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    HELD_LOCKS.append(f)
    return ["run", "--config", SMOKE, "--out", str(prev)]


def no_cuda(tmp, prev, mp):
    import torch
    mp.setattr(torch.cuda, "is_available", lambda: False)
    return sets("device=cuda")(tmp, prev, mp)


def cuda_graphs_no_gpu(tmp, prev, mp):
    import torch
    mp.setattr(torch.cuda, "is_available", lambda: False)
    return fresh_out_with("device=auto", "train.cuda_graphs=true")(tmp, prev, mp)


def cuda_graphs_torchrun(tmp, prev, mp):
    """Rank 0's view of a 2-rank run (the real torchrun launch is tests/test_distributed.py's business)."""
    from pipeline.train import distributed
    mp.setattr(distributed, "active", lambda: distributed.World(0, 2))
    mp.setattr(distributed, "broadcast", lambda obj=None: obj)   # no other rank listens here
    return fresh_out_with("device=auto", "train.cuda_graphs=true")(tmp, prev, mp)


def interrupted_at_start(tmp, prev, mp):
    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    mp.setattr("pipeline.config.load_config", ctrl_c)
    return ["run", "--config", SMOKE, "--out", str(prev)]


def internal_error(tmp, prev, mp):
    def bug(*a, **k):
        raise ValueError("an internal bug")
    mp.setattr("pipeline.run.runner.run_pipeline", bug)
    return ["run", "--config", SMOKE, "--out", str(tmp / "bug")]


def user_folder(tmp, prev, mp):
    """An existing folder of the user's, with subfolders named like stages (the files must survive)."""
    user = tmp / "mine"
    (user / "train").mkdir(parents=True)
    (user / "train" / "my_model.pt").write_bytes(b"my weights")
    (user / "export").mkdir()
    (user / "export" / "prod.onnx").write_bytes(b"my graph")
    return ["run", "--config", SMOKE, "--out", str(user)]


def unrecorded_stage_folder(manifest: bytes | None = None):
    """A copy of the previous run with a stage folder its manifest does not record (or a manifest reading {})."""
    def setup(tmp, prev, mp):
        import shutil

        other = tmp / "other"
        shutil.copytree(prev, other)
        if manifest is None:
            (other / "export").mkdir()
            (other / "export" / "prod.onnx").write_bytes(b"my graph")
        else:
            (other / "manifest.json").write_bytes(manifest)
        return ["run", "--config", SMOKE, "--out", str(other)]
    return setup


def eval_of(train_entry: dict):
    """``pipeline eval --run`` on a run whose train stage is all there is (--until train, or a failed train)."""
    def setup(tmp, prev, mp):
        from pipeline.config import load_config, to_dict

        run = tmp / "partial"
        run.mkdir()
        manifest = {"config": to_dict(load_config(SMOKE)), "stages": {"train": train_entry}}
        (run / "manifest.json").write_text(json.dumps(manifest))
        return ["eval", "--run", str(run)]
    return setup


def fifo_config(tmp, prev, mp):
    import os

    os.mkfifo(tmp / "cfg.toml")
    return ["run", "--config", str(tmp / "cfg.toml"), "--out", str(prev)]


def device_setup_no_pip(tmp, prev, mp):
    """A uv-made venv (no pip module in this interpreter) and no uv, pip3 or pip on PATH."""
    from pipeline.devices.aarch64_emu import root as emu_root

    (tmp / "empty-bin").mkdir()
    mp.setenv("PATH", str(tmp / "empty-bin"))
    mp.setattr(emu_root, "_pip_importable", lambda: False)
    mp.setattr(emu_root, "_ensure_tools", lambda log: None)     # never apt-get from a test
    return ["device", "setup", "aarch64-emu", "--root", str(tmp / "arm64")]


def sigterm_at_start_up(tmp, prev, mp):
    import os
    import signal

    def terminated(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)   # the handler turns it into KeyboardInterrupt right here
        raise AssertionError("SIGTERM was not handled")
    mp.setattr("pipeline.config.load_config", terminated)
    return ["run", "--config", SMOKE, "--out", str(prev)]


def no_home(tmp, mp):
    mp.setenv("HOME", str(tmp / "no-such-home"))
    for env in ("PIPELINE_DATA_ROOT", "PIPELINE_ARM_ROOT", "PIPELINE_CACHE_DIR"):
        mp.delenv(env, raising=False)


def home_missing_data(tmp, prev, mp):
    no_home(tmp, mp)
    return ["run", "--config", SMOKE, "--out", str(tmp / "fresh")]


def home_missing_arm_root(tmp, prev, mp):
    no_home(tmp, mp)
    return ["device", "check", "aarch64-emu"]


def image_tree(tmp, classes=("cat", "dog", "emu"), odd=None):
    """tmp/imgs/{train,test}/<class>/<i>.png, 8x8; ``odd``: one extra image (path below imgs, size)."""
    from PIL import Image

    root = tmp / "imgs"
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8)).save(root / split / name / f"{i}.png")
    if odd:
        Image.new("RGB", odd[1]).save(root / odd[0])
    return root


def imagefolder_mixed_sizes(tmp):
    return image_tree(tmp, odd=("test/dog/big.png", (12, 10)))


def imagefolder_one_class(tmp):
    return image_tree(tmp, classes=("cat",))


def imagefolder_classes_differ(tmp):
    root = image_tree(tmp)
    (root / "test" / "emu").rename(root / "test" / "fox")
    return root


def imagefolder_empty_class(tmp):
    root = image_tree(tmp)
    for f in (root / "train" / "dog").iterdir():
        f.unlink()
    return root


def npz_file(**changes):
    """A tiny .npz of 3 classes (NHWC uint8) with ``changes`` applied (None removes a key)."""
    def data(tmp):
        rng = np.random.default_rng(0)
        arrays = {"x_train": rng.integers(0, 256, (300, 8, 8, 3), dtype=np.uint8), "y_train": np.arange(300) % 3,
                  "x_test": rng.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8), "y_test": np.arange(60) % 3}
        arrays.update(changes)
        np.savez(tmp / "data.npz", **{k: v for k, v in arrays.items() if v is not None})
        return tmp / "data.npz"
    return data


def no_npz(tmp):
    return tmp / "absent.npz"


def user_builder(body: str, *overrides):
    """The smoke config with model.arch naming a builder in a module file written for the case (a fresh name each
    time: Python caches imported modules)."""
    def setup(tmp, prev, mp):
        import uuid

        name = f"user_model_{uuid.uuid4().hex[:8]}"
        (tmp / f"{name}.py").write_text("import torch.nn as nn\n\n\n" + body)
        mp.syspath_prepend(str(tmp))
        return fresh_out_with(f"model.arch={name}:build", "model.noise_coef=0", "model.ensemble=1",
                              *overrides)(tmp, prev, mp)
    return setup


def grid(*args):
    return lambda t, p, m: ["sweep", "--config", SMOKE, *args, "--out", str(p)]


def ssh_device(target):
    return sets('bench.devices=[{target="host"}, {target="%s"}]' % target)


# id -> (setup, expected fragment of the message, exit code)
CASES = {
    "config-missing": (lambda t, p, m: ["run", "--config", str(t / "nope.toml"), "--out", str(p)], "file not found", 2),
    "config-is-directory": (lambda t, p, m: ["run", "--config", str(t), "--out", str(p)], "is a directory", 2),
    "config-invalid-toml": (config_file("name = \n"), "invalid TOML", 2),
    "config-latin1": (config_file('name = "caf\xe9"\n'.encode("latin-1")), "not UTF-8", 2),
    "config-empty": (config_file("# nothing\n"), "empty config", 2),
    "config-unknown-key": (config_file('name = "x"\nepochs = 3\n'), "unknown key 'epochs'", 2),
    "config-unknown-section": (config_file('name = "x"\n[trian]\nepochs = 3\n'), "unknown key 'trian'", 2),
    "config-unknown-nested-key": (config_file('name = "x"\n[train]\nepoch = 3\n'), "unknown key 'train.epoch'", 2),
    "config-wrong-type": (config_file('name = "x"\n[train]\nepochs = "ten"\n'), "train.epochs: expected int", 2),
    "set-malformed": (sets("prune.rgsm.lambda1"), "expected section.key=value", 2),
    "set-unknown-section": (sets("nosuch.key=1"), "--set: unknown key 'nosuch'", 2),
    "set-into-a-value": (sets("name.x=1"), "'name' is not a section", 2),
    "unknown-arch": (sets("model.arch=resnet1000"), "model.arch", 2),
    "unknown-attack": (sets("train.attack.kind=cw"), "train.attack.kind", 2),
    "eps-out-of-range": (sets("train.attack.eps_255=300"), "train.attack.eps_255", 2),
    "eval-step-above-eps": (sets("eval.step_255=100"), "eval.step_255", 2),
    "lr-nan": (sets("train.lr=nan"), "train.lr: expected a finite number", 2),
    "beta-inf": (sets("prune.rgsm.beta=inf"), "prune.rgsm.beta: expected a finite number", 2),
    "negative-noise": (sets("model.noise_coef=-0.1"), "model.noise_coef", 2),
    "momentum-above-one": (sets("train.momentum=2"), "train.momentum", 2),
    "nesterov-without-momentum": (sets("train.momentum=0"), "--set: train.nesterov", 2),
    "lr-gamma-zero": (sets("train.lr_gamma=0"), "train.lr_gamma", 2),
    "val-size-zero": (sets("data.val_size=0"), "data.val_size", 2),
    "opset-not-honoured": (sets("export.opset=7"), "export.opset", 2),
    "cuda-without-gpu": (no_cuda, "torch sees no CUDA device", 2),
    "cuda-graphs-on-cpu": (sets("train.cuda_graphs=true"), '--set: train.cuda_graphs: expected false with device = "cpu"', 2),
    "cuda-graphs-no-gpu": (cuda_graphs_no_gpu, "train.cuda_graphs = true needs a CUDA device; this run trains on cpu", 2),
    "cuda-graphs-torchrun": (cuda_graphs_torchrun, "train.cuda_graphs = true runs in one process; under torchrun (2 ranks)", 2),
    "align-with-paper-groups": (sets("prune.align=16"), "prune.align", 2),
    "unknown-groups": (sets("prune.groups=layers"), "prune.groups", 2),
    "bench-threads-not-a-list": (sets("bench.threads=2"), "bench.threads: expected a list", 2),
    "bench-batch-zero": (sets("bench.batches=[0]"), "bench.batches: expected a non-empty list of integers >= 1, got [0]", 2),
    "milestones-decreasing": (sets("train.lr_milestones=[0.8, 0.4]"), "train.lr_milestones", 2),
    "epochs-zero": (sets("train.epochs=0"), "train.epochs", 2),
    "out-is-a-file": (out_is_file, "exists and is not a directory", 2),
    "out-below-a-file": (out_below_file, "afile", 2),
    "out-read-only": (out_read_only, "Permission denied", 2),
    "disk-full": (disk_full, "No space left on device", 2),
    "manifest-not-json": (damaged_manifest(b"{not json"), "damaged, not readable JSON", 2),
    "manifest-binary": (damaged_manifest(b"\x00\xff\xfe\x01"), "damaged, not readable JSON", 2),
    "manifest-foreign": (damaged_manifest(b'{"stages": {"train": 3}}'), "not a pipeline manifest", 2),
    "run-folder-busy": (locked, "another 'pipeline run' is using this folder", 2),
    "data-missing-offline": (fresh_out_with(data=empty_data), "CIFAR-10 not found", 2),
    "data-damaged": (fresh_out_with(data=damaged_data), "data_batch_2: damaged", 2),
    "ctrl-c-at-start-up": (interrupted_at_start, "interrupted", 2),
    "unknown-prune-method": (sets("prune.method=obd"), "prune.method: expected one of rgsm, rvsm, admm, none", 2),
    "coupled-groups-without-rgsm": (sets("prune.method=rvsm", "prune.groups=coupled"),
                                    'prune.groups: expected "paper" unless prune.method = "rgsm"', 2),
    "admm-percentile-100": (sets("prune.admm.percentile=100"), "prune.admm.percentile: expected a percentile in [0, 100)", 2),
    "sweep-grid-malformed": (lambda t, p, m: ["sweep", "--config", SMOKE, "--grid", "prune.rgsm.lambda1", "--out",
                                              str(p)], "--grid prune.rgsm.lambda1: expected section.key=value1", 2),
    "sweep-grid-bad-value": (lambda t, p, m: ["sweep", "--config", SMOKE, "--grid", "prune.rgsm.lambda1=0.1,-1", "--out",
                                              str(p)], "--grid point prune.rgsm.lambda1=-1: prune.rgsm.lambda1: expected >= 0", 2),
    "share-from-missing": (lambda t, p, m: ["run", "--config", SMOKE, "--share-from", str(t / "nope"), "--out",
                                            str(p)], "--share-from", 2),
    "until-unknown-stage": (lambda t, p, m: ["run", "--config", SMOKE, "--until", "deploy", "--out", str(p)],
                            "--until deploy: expected one of train, latency, prune", 2),
    "device-unknown-target": (sets('bench.devices=[{target="host"}, {target="raspberrypi"}]'),
                              "bench.devices[1]: target: unknown device target 'raspberrypi'", 2),
    "device-ssh-password": (sets('bench.devices=[{target="host"}, {target="ssh://pi:secret@board"}]'),
                            "passwords do not belong in configs", 2),
    "device-without-host": (sets('bench.devices=[{target="aarch64-emu"}]'),
                            'bench.devices: expected a "host" device among them', 2),
    "device-duplicate-name": (sets('bench.devices=[{target="host"}, {target="host"}]'),
                              "bench.devices[1]: name: expected distinct device names", 2),
    "device-unknown-key": (sets('bench.devices=[{target="host", host="pi"}]'),
                           "unknown key 'bench.devices[0].host'", 2),
    "bench-device-bad-target": (lambda t, p, m: ["run", "--config", SMOKE, "--bench-device", "pi.local", "--out",
                                                 str(p)], "unknown device target 'pi.local'", 2),
    "noise-variants-without-deterministic": (sets('export.noise_variants=["stochastic"]'),
                                             "export.noise_variants: expected distinct names from deterministic", 2),
    "quantize-unknown-method": (sets("quantize.method=kl"), "quantize.method: expected one of ptq, qat", 2),
    "quantize-calibration-moved": (sets("quantize.method=minmax"),
                                   "it moved to quantize.calibration = \"minmax\"", 2),
    "quantize-bits-unsupported": (sets("quantize.method=qat", "quantize.bits=4"),
                                  "quantize.bits: expected 8 with method = 'qat', got 4", 2),
    "quantize-method-while-disabled": (sets("quantize.enabled=false", "quantize.method=qat"),
                                       'quantize.method: expected "ptq" with quantize.enabled = false', 2),
    "quantize-admm-without-admm-prune": (sets("quantize.method=admm", "quantize.bits=4"),
                                         'quantize.method: expected "admm" only with prune.method = "admm"', 2),
    "quantize-relax-too-long": (sets("quantize.relax_epochs=5"),
                                "quantize.relax_epochs: expected at most quantize.epochs = 2, got 5", 2),
    "mobile-unknown-style": (sets("mobile.optimization_style=slow"),
                             "mobile.optimization_style: expected one of fixed, runtime, got 'slow'", 2),
    "mobile-unknown-level": (sets("mobile.optimization_level=max"),
                             "mobile.optimization_level: expected one of disable, basic, extended, layout, all", 2),
    "mobile-unknown-platform": (sets("mobile.target_platform=x86"),
                                "mobile.target_platform: expected one of arm, amd64, got 'x86'", 2),
    "mobile-int4-asked": (sets("quantize.method=binary_relax", "quantize.bits=4", "quantize.weight_format=int4"),
                          "onnxruntime's .ort format has no INT4 tensors", 2),
    "budget-target-not-above-one": (sets("prune.groups=coupled", "prune.budget=macs", "prune.target=1"),
                                    "prune.target: expected a ratio > 1 (dense cost / pruned cost), got 1.0", 2),
    "budget-without-coupled-groups": (sets("prune.budget=macs"),
                                      'prune.budget: expected "none" unless prune.groups = "coupled"', 2),
    "budget-unknown-device": (sets("prune.groups=coupled", "prune.budget=latency", "prune.budget_device=pi"),
                              "prune.budget_device: expected a device name of bench.devices (host)", 2),
    "budget-latency-emulated": (sets("prune.groups=coupled", "prune.budget=latency",
                                     'bench.devices=[{target="host"}, {target="aarch64-emu", name="arm"}]',
                                     "prune.budget_device=arm"),
                                "prune.budget_device: expected a device whose timings are latencies: 'arm' is emulated",
                                2),
    "budget-unreachable": (fresh_out_with("prune.groups=coupled", "prune.budget=macs", "prune.target=100"),
                           "prune.target = 100 cannot be met", 2),
    "widths-do-not-fit": (sets('model.widths={"members.0.layer1.0.conv1" = [4, 3]}'),
                          "model.widths: expected per-layer widths that fit test_resnet", 2),
    "baseline-without-run": (lambda t, p, m: ["baseline", "--run", str(p)], "no finished run here", 2),
    "internal-error": (internal_error, "internal error: ValueError: an internal bug (rerun with --debug", 1),
    "out-not-a-run-folder": (user_folder, "not empty and not a pipeline run folder (no manifest.json; holds export, "
                                          "train)", 2),
    "stage-folder-not-recorded": (unrecorded_stage_folder(), "export: exists but", 2),
    "manifest-empty": (unrecorded_stage_folder(b"{}"), "records no finished 'train' stage there", 2),
    "set-inline-table": (sets('train={epochs="ten"}'), "--set: train.epochs: expected int", 2),
    "set-value-for-a-section": (sets("data=1"), "--set: data: expected a table, got int (1)", 2),
    "set-value-for-a-subsection": (sets("train.attack=pgd"), "--set: train.attack: expected a table, got str", 2),
    "eval-run-until-train": (eval_of({"status": "done", "key": "k", "outputs": {}}),
                             "stage(s) train, latency, prune", 2),
    "eval-run-training-failed": (eval_of({"status": "failed", "key": "k", "last_failure": {"error": "nan"}}),
                                 "stage(s) train, latency, prune", 2),
    "seed-negative": (sets("seed=-1"), "--set: seed: expected an integer in [0, 2,147,483,648), got -1", 2),
    "seed-huge": (sets("seed=100000000000000000000000"), "--set: seed: expected an integer in [0, 2,147,483,648)", 2),
    "qemu-cpu-unknown": (sets('bench.devices=[{target="host"}, {target="aarch64-emu", qemu_cpu="pentium4"}]'),
                         "bench.devices[1]: qemu_cpu: expected one of cortex-a72, cortex-a76, neoverse-n1, max", 2),
    "val-size-leaves-no-batch": (sets("data.val_size=49999"), "data.val_size: expected at most 50,000 - "
                                                              "train.batch_size = 49,936", 2),
    "parity-draws-one": (sets("export.parity_draws=1"), "export.parity_draws: expected >= 2", 2),
    "surgery-tol-huge": (sets("surgery.tol=1e10"), "surgery.tol: expected a tolerance in (0, 1e-3]", 2),
    "data-root-unknown-user": (sets('data.root="~nosuchuser/x"'), "'~nosuchuser' names no user of this machine", 2),
    "config-nested-too-deep": (config_file("a = " + "[" * 5000 + "]" * 5000 + "\n"), "nested too deeply", 2),
    "config-is-a-fifo": (fifo_config, "not a regular file (a FIFO)", 2),
    "warmup-longer-than-epochs": (sets("train.lr_warmup_epochs=100"), "train.lr_warmup_epochs: expected at most "
                                                                      "train.epochs", 2),
    "ssh-port-zero": (ssh_device("ssh://pi@board:0"), "port of 'ssh://pi@board:0' is not a number in 1..65535", 2),
    "ssh-empty-user": (ssh_device("ssh://@board"), "user of 'ssh://@board': expected a login name", 2),
    "ssh-user-like-an-option": (ssh_device("ssh://-oProxyCommand=x@board"), "expected a login name, not empty and "
                                                                            "not starting with '-'", 2),
    "eval-no-attacks": (sets("eval.attacks=[]"), "eval.attacks: expected at least one attack", 2),
    "eval-no-models": (sets("eval.models=[]"), "eval.models: expected at least one model", 2),
    "pgd-steps-zero": (sets("eval.pgd_steps=0"), "eval.pgd_steps: expected > 0", 2),
    "device-setup-no-pip": (device_setup_no_pip, "no pip found to fetch the aarch64 wheels", 2),
    "sigterm": (sigterm_at_start_up, "interrupted (SIGTERM); finished stages are kept", 2),
    "home-missing-data": (home_missing_data, "no-such-home does not exist, so there is no default CIFAR-10 folder", 2),
    "home-missing-arm-root": (home_missing_arm_root, "does not exist, so there is no default arm64 root", 2),
    "data-cifar100-missing-offline": (fresh_out_with("data.dataset=cifar100", data=empty_data), "CIFAR-100 not found", 2),
    "data-svhn-missing-offline": (fresh_out_with("data.dataset=svhn", data=empty_data), "SVHN not found", 2),
    "imagefolder-mixed-sizes": (fresh_out_with("data.dataset=imagefolder", data=imagefolder_mixed_sizes),
                                "without data.image_size every image must have one size", 2),
    "imagefolder-one-class": (fresh_out_with("data.dataset=imagefolder", data=imagefolder_one_class),
                              "a classifier needs at least 2", 2),
    "imagefolder-classes-differ": (fresh_out_with("data.dataset=imagefolder", data=imagefolder_classes_differ),
                                   "(only in train: emu; only in test: fox)", 2),
    "imagefolder-empty-class": (fresh_out_with("data.dataset=imagefolder", data=imagefolder_empty_class),
                                "train/dog holds no images", 2),
    "npz-missing": (fresh_out_with("data.dataset=npz", data=no_npz), "absent.npz: no such .npz file", 2),
    "npz-missing-key": (fresh_out_with("data.dataset=npz", data=npz_file(y_test=None)), "no array 'y_test'", 2),
    "npz-not-uint8": (fresh_out_with("data.dataset=npz", data=npz_file(x_train=np.zeros((300, 8, 8, 3), np.float32))),
                      "x_train is float32, expected uint8", 2),
    "npz-negative-labels": (fresh_out_with("data.dataset=npz", data=npz_file(y_train=np.arange(300) % 3 - 1)),
                            "y_train holds negative labels (min -1)", 2),
    "npz-shapes-differ": (fresh_out_with("data.dataset=npz", data=npz_file(x_test=np.zeros((60, 6, 6, 3), np.uint8))),
                          "x_train images are 3x8x8 (CxHxW) but x_test images are 3x6x6", 2),
    "val-size-above-dataset": (fresh_out_with("data.dataset=npz", "data.val_size=300", data=npz_file()),
                               "data.val_size = 300 leaves no training images (have 300)", 2),
    "builder-not-importable": (sets("model.arch=no_such_module:build", "model.noise_coef=0", "model.ensemble=1"),
                               "model.arch: expected \"package.module:function\" naming an importable builder "
                               "(cannot import module no_such_module (ModuleNotFoundError", 2),
    "builder-returns-no-module": (user_builder("def build(num_classes):\n    return 42\n"),
                                  "returned a int, not a torch.nn.Module", 2),
    "builder-wrong-output-shape": (user_builder("def build(num_classes):\n    return nn.Sequential(nn.AdaptiveAvgPool2d(1), "
                                                "nn.Flatten(), nn.Linear(3, 5))\n"),
                                   "to [2, 5]; expected [2, 10] (logits of the 10 classes)", 2),
    "noise-without-noise-sites": (sets("model.arch=mobilenet_v2_cifar", "model.ensemble=1"),
                                  "model.noise_coef: expected 0 for mobilenet_v2_cifar", 2),
    "external-ensemble": (sets("model.arch=os.path:join", "model.noise_coef=0"),
                          "model.ensemble: expected 1 with the user's builder os.path:join", 2),
    "grid-unknown-key": (grid("--grid", "nosuch.key=1,2"), "--grid point nosuch.key=1: unknown key 'nosuch'", 2),
    "bench-device-empty": (lambda t, p, m: ["run", "--config", SMOKE, "--bench-device", "", "--out", str(p)],
                           "--bench-device: bench.devices[1]: target: unknown device target ''", 2),
    "grid-unclosed-list": (grid("--grid", "bench.threads=[1,2],[1"), "an empty value, or an unclosed bracket", 2),
    "grid-same-point-twice": (grid("--grid", "prune.rgsm.lambda1=1,1.0"), "prune.rgsm.lambda1=1 and 1.0 are the "
                                                                          "same value", 2),
}


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory):
    """A finished-looking run folder (manifest + outputs) that no mistake may touch."""
    prev = tmp_path_factory.mktemp("prev") / "run"
    (prev / "train").mkdir(parents=True)
    (prev / "train" / "model.pt").write_bytes(b"weights")
    import hashlib
    manifest = {"stages": {"train": {"status": "done", "key": "k", "outputs": {"model_weights": {
        "path": "train/model.pt", "sha256": hashlib.sha256(b"weights").hexdigest()}}}}}
    (prev / "manifest.json").write_text(json.dumps(manifest))
    (prev / "report.md").write_text("# previous\n")
    return prev


def snapshot(folder: Path) -> dict:
    """Every file's bytes; the empty .lock file (the busy case holds it) carries no data and is left out."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_catalogue_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", list(CASES))
def test_mistake_gives_one_line_and_changes_nothing(case, previous_run, tmp_path, monkeypatch, capsys,
                                                    cifar_root):
    setup, expected, code = CASES[case]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = snapshot(previous_run)
    argv = setup(tmp_path, previous_run, monkeypatch)
    try:
        rc = cli.main(argv)
    finally:
        while HELD_LOCKS:
            HELD_LOCKS.pop().close()
    err = capsys.readouterr().err.strip()
    assert rc == code, (case, rc, err)
    assert "Traceback" not in err and err.count("\n") == 0, (case, err)
    assert err.startswith("pipeline: ") and expected in err, (case, err)
    monkeypatch.undo()
    assert snapshot(previous_run) == before, case


def test_a_users_folder_is_refused_and_every_file_survives(tmp_path, capsys):
    argv = user_folder(tmp_path, None, None)
    user = Path(argv[-1])
    before = snapshot(user)
    assert cli.main(argv) == 2
    assert "not a pipeline run folder" in capsys.readouterr().err
    assert snapshot(user) == before and sorted(p.name for p in user.iterdir()) == ["export", "train"]


def test_an_unrecorded_stage_folder_survives(previous_run, tmp_path, capsys):
    argv = unrecorded_stage_folder()(tmp_path, previous_run, None)
    other = Path(argv[-1])
    before = snapshot(other)
    assert cli.main(argv) == 2 and "export: exists but" in capsys.readouterr().err
    assert snapshot(other) == before


def test_debug_shows_the_traceback_of_an_internal_error(tmp_path, monkeypatch):
    internal_error(tmp_path, tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(["run", "--debug", "--config", SMOKE, "--out", str(tmp_path / "bug")])


def test_every_case_is_documented():
    doc = (REPO / "docs" / "errors.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", doc, flags=re.M))
    assert documented == set(CASES), (set(CASES) - documented, documented - set(CASES))
    assert "docs/errors.md" in (REPO / "README.md").read_text()
