import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, RunConfig, flatten, load_config

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path, text, name="cfg.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def config_error(path, overrides=()):
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg.strip(), f"not one line: {msg!r}"
    assert msg.strip(), "empty message"
    return msg


# --------------------------------------------------------------------------- defaults

def test_defaults_are_the_paper_setup():
    cfg = load_config(None)
    assert isinstance(cfg, RunConfig)
    assert cfg.model.arch == "preact_resnet20" and cfg.model.noise_coef == 0.1
    assert cfg.data.val_size == 5000
    assert cfg.train.attack.steps == 10 and cfg.train.attack.eps_255 == 8.0 and cfg.train.attack.step_255 == 2.0
    assert cfg.prune.zero_tol == 1e-15


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(Exception):
        cfg.seed = 3  # type: ignore[misc]


# --------------------------------------------------------------------------- unknown keys

def test_unknown_top_level_key(tmp_path):
    p = write(tmp_path, 'name = "x"\nepochz = 3\n')
    msg = config_error(p)
    assert str(p) in msg and "'epochz'" in msg


def test_unknown_nested_key(tmp_path):
    p = write(tmp_path, "[train]\nepochs = 2\n[train.attack]\nkind = \"pgd\"\nx = 1\n")
    msg = config_error(p)
    assert str(p) in msg
    assert "train.attack.x" in msg


def test_unknown_section(tmp_path):
    p = write(tmp_path, "[trian]\nepochs = 2\n")
    msg = config_error(p)
    assert str(p) in msg and "trian" in msg


# --------------------------------------------------------------------------- types

@pytest.mark.parametrize("text,key,expected,got", [
    ('[train]\nepochs = "ten"\n', "train.epochs", "int", "str"),
    ("[train]\nlr = true\n", "train.lr", "float", "bool"),
    ("[train]\nepochs = 2.5\n", "train.epochs", "int", "float"),
    ("seed = true\n", "seed", "int", "bool"),
    ('[data]\ndownload = 1\n', "data.download", "bool", "int"),
    ('[model]\narch = 20\n', "model.arch", "str", "int"),
    ('[train]\nlr_milestones = 0.5\n', "train.lr_milestones", "list", "float"),
    ('[train]\nlr_milestones = [0.5, "x"]\n', "train.lr_milestones[1]", "float", "str"),
    ('train = 3\n', "train", "table", "int"),
])
def test_wrong_type(tmp_path, text, key, expected, got):
    p = write(tmp_path, text)
    msg = config_error(p)
    assert str(p) in msg and key in msg
    assert "expected" in msg and expected in msg and got in msg


def test_int_accepted_for_float(tmp_path):
    p = write(tmp_path, "[train]\nlr = 1\n[prune]\nlr_milestones = [1]\n[prune.rgsm]\nlambda1 = 2\n")
    cfg = load_config(p)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.prune.methods["rgsm"].lambda1 == 2.0 and isinstance(cfg.prune.methods["rgsm"].lambda1, float)
    assert cfg.prune.lr_milestones == (1.0,) and isinstance(cfg.prune.lr_milestones[0], float)


# --------------------------------------------------------------------------- values

@pytest.mark.parametrize("text,key", [
    ('[prune]\ninit = "x"\n', "prune.init"),
    ('[train.attack]\nkind = "cw"\n', "train.attack.kind"),
    ('device = "tpu"\n', "device"),
    ('[model]\narch = "resnet9000"\n', "model.arch"),
    ("[model]\nensemble = 0\n", "model.ensemble"),
    ("[prune.rgsm]\nlambda1 = -0.1\n", "prune.rgsm.lambda1"),
    ("[train]\nlr_milestones = [0.6, 0.4]\n", "train.lr_milestones"),
    ("[train]\nlr_milestones = [1.5]\n", "train.lr_milestones"),
])
def test_bad_value(tmp_path, text, key):
    p = write(tmp_path, text)
    msg = config_error(p)
    assert str(p) in msg and key in msg and "expected" in msg


def test_bad_choice_lists_choices(tmp_path):
    msg = config_error(write(tmp_path, '[prune]\ninit = "x"\n'))
    assert "finetune" in msg and "scratch" in msg and "'x'" in msg


def test_invalid_toml_is_one_line(tmp_path):
    p = write(tmp_path, "[train\nepochs = = 3\n")
    msg = config_error(p)
    assert str(p) in msg and "TOML" in msg


def test_missing_file(tmp_path):
    p = tmp_path / "nope.toml"
    msg = config_error(p)
    assert str(p) in msg and "not found" in msg


# --------------------------------------------------------------------------- --set overrides

def test_set_overrides(tmp_path):
    p = write(tmp_path, '[prune]\ninit = "finetune"\n[prune.rgsm]\nlambda1 = 0.05\n[train.attack]\nkind = "pgd"\n')
    cfg = load_config(p, ["prune.rgsm.lambda1=0.5", "prune.init=scratch", "train.lr_milestones=[0.5, 0.75]",
                          "train.attack.kind=fgsm_rs", "seed=7", 'name="quoted"', "train.epochs = 3",
                          "data.download=false"])
    assert cfg.prune.methods["rgsm"].lambda1 == 0.5
    assert cfg.prune.init == "scratch"                     # bare word -> string
    assert cfg.train.lr_milestones == (0.5, 0.75)           # TOML list -> tuple
    assert cfg.train.attack.kind == "fgsm_rs"               # three levels deep
    assert cfg.seed == 7 and cfg.name == "quoted" and cfg.train.epochs == 3
    assert cfg.data.download is False
    # untouched values keep the file's / defaults
    assert cfg.train.attack.steps == 10


def test_set_overrides_defaults_without_file():
    cfg = load_config(None, ["model.arch=test_resnet", "model.ensemble=2"])
    assert (cfg.model.arch, cfg.model.ensemble) == ("test_resnet", 2)


def test_set_later_wins():
    assert load_config(None, ["seed=1", "seed=2"]).seed == 2


@pytest.mark.parametrize("override,key", [
    ("prune.lambda=0.1", "prune.lambda"),
    ("train.attack.x=1", "train.attack.x"),
    ("train.epochs=ten", "train.epochs"),
    ("prune.init=x", "prune.init"),
])
def test_set_errors_are_config_errors(override, key):
    msg = config_error(None, [override])
    assert key in msg


@pytest.mark.parametrize("override", ["noequals", "=3", "name.x=1"])
def test_malformed_set(override):
    config_error(None, [override])


# --------------------------------------------------------------------------- shipped configs

SHIPPED = sorted((REPO / "configs").glob("*.toml")) + sorted((REPO / "configs" / "paper").glob("*.toml"))


def test_shipped_configs_exist():
    assert REPO / "configs" / "smoke.toml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert flatten(cfg)  # every key resolved


def test_smoke_config_is_tiny():
    cfg = load_config(REPO / "configs" / "smoke.toml")
    assert cfg.model.arch == "test_resnet"
    assert cfg.device == "cpu"


# --------------------------------------------------------------------------- CLI

def run_cli(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(proc):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("pipeline: error:"), lines[0]
    return lines[0]


def test_cli_errors_are_one_line(tmp_path):
    """One interpreter start per case is the expensive part; the cases share this test."""
    bad = write(tmp_path, "[train]\nepochs = \"ten\"\n", "bad.toml")
    out = tmp_path / "out"
    line = assert_one_line_error(run_cli(["run", "--config", str(bad), "--out", str(out)], tmp_path))
    assert str(bad) in line and "train.epochs" in line
    assert not out.exists()   # nothing created for a config that does not load

    missing = tmp_path / "missing.toml"
    line = assert_one_line_error(run_cli(["run", "--config", str(missing), "--out", str(out)], tmp_path))
    assert str(missing) in line

    line = assert_one_line_error(run_cli(["run", "--config", str(REPO / "configs" / "smoke.toml"), "--out", str(out),
                                          "--set", "prune.lambda9=1"], tmp_path))
    assert "prune.lambda9" in line


def test_cli_show_config(tmp_path):
    proc = run_cli(["show-config", "--config", str(REPO / "configs" / "smoke.toml"), "--set", "seed=5"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "seed = 5" in lines
    assert 'model.arch = "test_resnet"' in lines


@pytest.mark.parametrize("name", ["smoke", "quickstart", "paper/en5resnet20_rgsm"])
def test_show_config_lines_are_toml_that_loads_back(name):
    """Every line `pipeline show-config` prints is TOML: given back as --set (or as a file) it reproduces the
    resolved config exactly -- lists, booleans and [[bench.devices]] tables included."""
    import tomllib

    from pipeline.config import show_lines

    path = REPO / "configs" / f"{name}.toml"
    cfg = load_config(path, ["bench.devices=[{target = 'host'}, {target = 'aarch64-emu', runs = 3}]"])
    lines = show_lines(cfg)
    assert any(line.startswith("bench.devices = [{target = \"host\"") for line in lines)
    settings = [line for line in lines if not line.startswith("#")]
    for line in settings:   # each one valid TOML (dotted keys aside)
        key, _, value = line.partition(" = ")
        tomllib.loads(key.replace(".", "_") + " = " + value)
    assert load_config(None, settings) == cfg


def test_bench_optimizations_validated(tmp_path):
    msg = config_error(None, ["bench.optimizations=['all', 'fast']"])
    assert "bench.optimizations" in msg and "fast" in msg
    config_error(None, ["bench.optimizations=[]"])
    assert load_config(None, ["bench.optimizations=['basic']"]).bench.optimizations == ("basic",)


def test_prune_groups_and_align_validated():
    assert load_config(None).prune.groups == "paper" and load_config(None).prune.align == 1
    cfg = load_config(None, ["prune.groups=coupled", "prune.align=auto"])
    assert (cfg.prune.groups, cfg.prune.align) == ("coupled", "auto")
    assert load_config(None, ["prune.groups=coupled", "prune.align=16"]).prune.align == 16
    assert "prune.groups" in config_error(None, ["prune.groups=layer"])
    for bad in ("0", "-8", "'fast'", "1.5", "true"):
        msg = config_error(None, ["prune.groups=coupled", f"prune.align={bad}"])
        assert "prune.align" in msg, (bad, msg)
    # alignment is a property of whole channels: the paper's input-slice groups cannot honour it
    msg = config_error(None, ["prune.align=16"])
    assert "prune.align" in msg and "coupled" in msg


def test_bench_threads_and_batches_are_lists():
    b = load_config(None).bench
    assert (b.threads, b.batches) == ((1, 0), (1, 32))
    assert load_config(None, ["bench.threads=[2]", "bench.batches=[1, 8]"]).bench.batches == (1, 8)
    assert "bench.threads" in config_error(None, ["bench.threads=2"])
    assert "bench.threads" in config_error(None, ["bench.threads=[-1]"])
    assert "bench.batches" in config_error(None, ["bench.batches=[]"])
    assert "bench.batches" in config_error(None, ["bench.batches=[0]"])


# --------------------------------------------------------------------------- values that used to run to exit 0

@pytest.mark.parametrize("override,key", [
    ("train.attack.eps_255=300", "train.attack.eps_255"),
    ("train.attack.eps_255=0", "train.attack.eps_255"),
    ("eval.step_255=100", "eval.step_255"),                 # step larger than the eval radius
    ("train.attack.step_255=9", "train.attack.step_255"),   # pgd step > eps 8
    ("train.lr=nan", "train.lr"),
    ("prune.rgsm.beta=inf", "prune.rgsm.beta"),
    ("prune.rgsm.lambda1=-inf", "prune.rgsm.lambda1"),
    ("model.noise_coef=-0.1", "model.noise_coef"),
    ("train.momentum=2", "train.momentum"),
    ("train.momentum=1", "train.momentum"),
    ("train.lr_gamma=0", "train.lr_gamma"),
    ("prune.lr_gamma=1.5", "prune.lr_gamma"),
    ("data.val_size=0", "data.val_size"),
    ("export.opset=7", "export.opset"),                      # dynamo would silently write opset 18
    ("train.lr_milestones=[0.5, nan]", "train.lr_milestones"),
])
def test_nonsense_values_are_refused_naming_set(override, key):
    msg = config_error(None, [override])
    assert msg.startswith("--set: ") and key in msg, msg


def test_nesterov_needs_momentum():
    msg = config_error(None, ["train.momentum=0"])
    assert "train.nesterov" in msg and "momentum" in msg
    assert load_config(None, ["train.momentum=0", "train.nesterov=false"]).train.momentum == 0


def test_opset_ranges_follow_the_exporter():
    assert load_config(None, ["export.opset=7", "export.dynamo=false"]).export.opset == 7
    assert "export.opset" in config_error(None, ["export.opset=24", "export.dynamo=false"])
    assert load_config(None, ["export.opset=21"]).export.opset == 21


def test_cuda_without_gpu_is_refused_at_load(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    msg = config_error(None, ["device=cuda"])
    assert "device" in msg and "CUDA" in msg


def test_value_from_file_blames_the_file(tmp_path):
    path = write(tmp_path, "[train]\nmomentum = 2.0\n")
    msg = config_error(path)
    assert msg.startswith(str(path)) and "train.momentum" in msg


def test_latin1_config_names_the_encoding(tmp_path):
    p = tmp_path / "latin1.toml"
    p.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    msg = config_error(p)
    assert "UTF-8" in msg and str(p) in msg and "0xe9" in msg


def test_bom_is_accepted(tmp_path):
    p = tmp_path / "bom.toml"
    p.write_bytes(b"\xef\xbb\xbfname = \"bom\"\n")
    assert load_config(p).name == "bom"


def test_empty_config_is_an_error(tmp_path):
    msg = config_error(write(tmp_path, "# nothing here\n"))
    assert "empty config" in msg


def test_directory_as_config(tmp_path):
    assert "directory" in config_error(tmp_path)


def test_unknown_section_from_set_blames_set(tmp_path):
    msg = config_error(write(tmp_path, 'name = "x"\n'), ["nosuch.key=1"])
    assert msg.startswith("--set: ") and "nosuch" in msg


@pytest.mark.parametrize("override,message", [
    ("prune.method=obd", "prune.method: expected one of rgsm, rvsm, admm, none"),
    ("prune.rvsm.penalty=l2", "prune.rvsm.penalty: expected one of l0, l1, tl1"),
    ("prune.admm.sparsity=filter", "prune.admm.sparsity: expected one of elem, channel"),
    ("prune.rgsm.prox=medium", "prune.rgsm.prox: expected one of hard, soft"),
    ("train.reset_optimizer=batch", "train.reset_optimizer: expected one of never, epoch"),
    ("prune.admm.percentile=100", "prune.admm.percentile: expected a percentile in [0, 100)"),
    ("prune.admm.rho=0", "prune.admm.rho: expected > 0"),
    ("prune.rvsm.tl1_a=-1", "prune.rvsm.tl1_a: expected > 0"),
    ("prune.rvsm.lam=-1e-6", "prune.rvsm.lam: expected >= 0"),
])
def test_method_settings_validated(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_method_combinations_validated():
    with pytest.raises(ConfigError, match=r'prune.groups: expected "paper" unless prune.method = "rgsm"'):
        load_config(None, ["prune.method=rvsm", "prune.groups=coupled"])
    with pytest.raises(ConfigError, match=r'prune.rgsm.prox: expected "hard" when prune.align is not 1'):
        load_config(None, ["prune.groups=coupled", "prune.align=8", "prune.rgsm.prox=soft"])
    cfg = load_config(None, ["prune.method=admm", "prune.admm.sparsity=channel", "model.normalize=false"])
    assert (cfg.prune.method, cfg.prune.methods["admm"].sparsity, cfg.model.normalize) == ("admm", "channel", False)


def test_recorded_configs_from_before_quantize_calibration_still_load():
    """Runs recorded before quantize.calibration existed named onnxruntime's calibration in quantize.method: their
    recorded config (pipeline eval --run) loads with it moved; a config file with it gets the one-line MOVED error."""
    from pipeline.config import load_config

    cfg = load_config(None, data={"quantize": {"method": "entropy", "calibration_images": 64}})
    assert (cfg.quantize.method, cfg.quantize.calibration, cfg.quantize.calibration_images) == ("ptq", "entropy", 64)
