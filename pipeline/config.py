"""Run configuration: frozen dataclasses loaded from TOML, validated, with ``--set section.key=value`` overrides.

Every mistake (unknown key, wrong type, bad value) becomes a ``ConfigError`` whose message is one line naming
the file, the dotted key, what was expected and what was found.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError


class ConfigError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class DataConfig:
    root: str = ""              # folder holding cifar-10-batches-py; "" = $PIPELINE_DATA_ROOT, else ~/.cache
    download: bool = True       # torchvision download when the files are absent
    val_size: int = 5000        # held out of the 50k training images (paper: 45k/5k)
    train_subset: int = 0       # 0 = all remaining training images
    test_subset: int = 0        # 0 = all 10k test images; else a seeded subset
    split_seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "preact_resnet20"
    ensemble: int = 1
    noise_coef: float = 0.1
    # Mean/std normalisation inside the model. The paper's reference code feeds raw [0, 1] pixels to the stem
    # (false); either way the model and its ONNX graph take [0, 1] images.
    normalize: bool = True
    # "grouped": the train stage runs the n members as one network of grouped convs (models/grouped.py; same
    # function, fewer kernel launches -- for GPUs); artifacts are saved as the member list either way.
    ensemble_impl: str = "members"


@dataclass(frozen=True)
class AttackConfig:
    """Attack used *during training* to craft adversarial examples."""
    kind: str = "pgd"           # "pgd" | "fgsm_rs" | "none" (natural training)
    eps_255: float = 8.0
    step_255: float = 2.0       # PGD step; fgsm_rs always steps 1.25*eps (Wong et al., 2020)
    steps: int = 10             # PGD iterations (paper: 10); ignored for fgsm_rs
    random_start: bool = True


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_milestones: tuple[float, ...] = (0.4, 0.6, 0.8)   # fractions of epochs (paper: 80/120/160 of 200)
    lr_gamma: float = 0.1
    # Linear warm-up of the learning rate over the first this many epochs of the train and the prune stage (0 =
    # none, the paper). For a batch larger than the paper's 128: lr and prune.lr = 0.1 * batch_size/128 with
    # about 5 warm-up epochs (linear scaling rule, Goyal et al. 2017; configs/gpu_en5resnet20_rgsm_b512.toml).
    lr_warmup_epochs: int = 0
    attack: AttackConfig = field(default_factory=AttackConfig)
    val_attack_steps: int = 10      # PGD steps for checkpoint selection on the validation split
    val_subset: int = 0             # 0 = the whole validation split
    # EnResNet's noise scale is the std of the whole batch activation, so validation accuracy depends on this.
    val_batch_size: int = 256
    augment: bool = True
    # "epoch": a new SGD optimizer every epoch (train and prune), as the reference code does -- so momentum
    # restarts after each epoch-end hard projection. "never": one optimizer for the whole stage.
    reset_optimizer: str = "never"
    # train and prune save a resumable checkpoint (weights, optimizer, sparsifier, RNG states) every this many
    # epochs, so a killed run continues from there; 0 = never. Not part of any stage key: it changes no result.
    checkpoint_every: int = 1
    # "bf16": attack + forward under bf16 autocast (weights and optimizer fp32); channels_last: NHWC tensors.
    # Both are for GPUs (pipeline bench-train --variants measures them); the paper configs keep fp32.
    precision: str = "fp32"
    channels_last: bool = False
    # Capture the attack + forward + backward of each full batch as a CUDA graph and replay it (one process on a
    # CUDA device; pipeline/training.py TrainStep). Not part of any stage key: the same kernels in the same order.
    cuda_graphs: bool = False


@dataclass(frozen=True)
class PruneConfig:
    # "rgsm" (channel groups), "rvsm" (unstructured), "admm" (the paper's baseline), "none" (the train
    # checkpoint passes through unchanged: a dense baseline row)
    method: str = "rgsm"
    # "paper": groups are conv input-channel slices (the paper's RGSM). "coupled": one group per removable
    # channel (DependencyGraph: producers' filters, BN entries, every reader's slice), so sparsity = removability.
    groups: str = "paper"
    # Kept channels per coupled family: a multiple of this (never below it), so pruned widths match the SIMD
    # block of the target's conv kernels. "auto" = the host's onnxruntime NCHWc block (see pipeline/hardware.py).
    align: int | str = 1
    # Coupled groups differ in size; each group's lambda1 is scaled by what it costs relative to an average paper
    # group: "macs" (compute per image its removal saves -- what latency follows) or "weights" (parameters).
    group_cost: str = "macs"
    init: str = "finetune"      # "finetune" (start from the train checkpoint) | "scratch" (paper's from-scratch mode)
    beta: float = 1.0
    lambda1: float = 0.05       # group l0 weight: threshold sqrt(2*lambda1/beta)
    lambda2: float = 1e-5       # group lasso weight
    epochs: int = 200
    lr: float = 0.1
    lr_milestones: tuple[float, ...] = (0.4, 0.6, 0.8)
    lr_gamma: float = 0.1
    zero_tol: float = 1e-15     # paper: a group counts as zero when its l2 norm is below this
    rgsm_prox: str = "hard"     # "hard": group l0, threshold sqrt(2*lambda1/beta) (paper); "soft": group lasso, lambda1/beta
    # RVSM (uses beta above): elementwise prox of rvsm_lambda*penalty; "l0" threshold sqrt(2*rvsm_lambda/beta)
    # (paper), "l1" soft threshold rvsm_lambda/beta, "tl1" transformed l1 with parameter tl1_a
    penalty: str = "l0"
    rvsm_lambda: float = 1e-6
    tl1_a: float = 1.0
    # ADMM: keep each layer's top (100 - percentile) % of weights ("elem") or input channels ("channel")
    sparsity: str = "elem"
    percentile: float = 80.0
    rho: float = 1e-2


@dataclass(frozen=True)
class EvalConfig:
    """Stage ``eval``: test-set accuracy of the dense, masked and pruned models under attack."""
    models: tuple[str, ...] = ("dense", "masked", "pruned")
    attacks: tuple[str, ...] = ("fgsm", "ifgsm", "cw_paper", "pgd", "eot_pgd", "apgd_ce", "apgd_dlr")
    images: int = 0             # 0 = the whole evaluated test set (data.test_subset); else a seeded subset of it
    batch_size: int = 256
    # The paper's columns, with its reference script's constants (in [0, 1] pixel units, not /255).
    paper_eps_01: float = 0.031
    paper_step_01: float = 0.007
    ifgsm_steps: int = 20
    cw_steps: int = 50
    cw_lr: float = 6e-4
    cw_c: float = 10.0
    cw_kappa: float = 0.0
    # Strong attacks.
    eps_255: float = 8.0
    step_255: float = 2.0
    pgd_steps: int = 50
    pgd_restarts: int = 2
    eot_samples: int = 4        # EOT-PGD: input gradient averaged over this many noise draws (pgd_steps steps)
    apgd_steps: int = 100
    avg_passes: int = 8         # stochastic model: also score with the softmax averaged over this many passes
    noise_off_too: bool = True  # also evaluate with the test-time noise off (the function the ONNX graph computes)
    per_sample_too: bool = True  # also evaluate with the noise scale computed per image (export's per_sample variant)
    sweep_eps_255: tuple[float, ...] = (0.0, 2.0, 4.0, 8.0)   # sanity: PGD accuracy must not rise with eps
    sweep_steps: int = 10
    sanity_slack_pt: float = 1.0  # least slack for comparisons of stochastic numbers (percentage points)


@dataclass(frozen=True)
class PaperConfig:
    """The paper's numbers for the table row a config reproduces (report.md prints ours beside them)."""
    row: str = ""
    a1_natural: float | None = None
    a2_fgsm: float | None = None
    a3_ifgsm20: float | None = None
    a4_cw: float | None = None
    channel_sparsity: float | None = None   # Tables 2-4 "Ch. Sp."
    weight_sparsity: float | None = None    # Tables 1 and 4 unstructured "Sp."


@dataclass(frozen=True)
class SurgeryConfig:
    tol: float = 1e-15


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 18
    dynamo: bool = True
    simplify: bool = True
    parity_tol: float = 1e-4
    # Deployable noise variants (pipeline/stages/export.py). "deterministic" (noise removed) is always written;
    # "stochastic" keeps EnResNet's noise in the graph as trained (std over the whole batch tensor), "per_sample"
    # computes each image's noise scale from that image alone. With model.noise_coef = 0 only "deterministic" is made.
    noise_variants: tuple[str, ...] = ("deterministic", "stochastic", "per_sample")
    parity_draws: int = 200     # noisy passes per side for the statistical torch-vs-ORT check of noisy graphs


@dataclass(frozen=True)
class QuantizeConfig:
    """Stage ``quantize``: onnxruntime static int8 quantisation (QDQ) of the deterministic dense and pruned graphs."""
    enabled: bool = True
    calibration_images: int = 256   # seeded training images (never test) for the activation ranges
    per_channel: bool = True        # per-output-channel weight scales
    method: str = "minmax"          # "minmax" | "entropy" | "percentile" (onnxruntime CalibrationMethod)
    op_types: tuple[str, ...] = ("Conv", "Gemm", "MatMul", "Add")


@dataclass(frozen=True)
class DeviceConfig:
    """One ``[[bench.devices]]`` entry: where the ONNX artifacts are timed (pipeline/devices)."""
    target: str = "host"        # "host" | "aarch64-emu" | "ssh://user@host[:port]"
    name: str = ""              # label in the report; "" = derived from the target
    qemu_cpu: str = "neoverse-n1"   # aarch64-emu: emulated CPU (cortex-a72 NEON, neoverse-n1 dotprod, max SVE2/SME)
    root: str = ""              # aarch64-emu: the arm64 root; "" = $PIPELINE_ARM_ROOT, else ~/.cache/pipeline/aarch64-root
    python: str = "python3"     # ssh: the remote interpreter (with numpy + onnxruntime)
    images: int = 0             # test images predicted on the device (agreement with host); 0 = all bench images
    # 0 / empty = bench.runs, bench.warmup, bench.batches, bench.threads, bench.optimizations
    runs: int = 0
    warmup: int = 0
    batches: tuple[int, ...] = ()
    threads: tuple[int, ...] = ()
    optimizations: tuple[str, ...] = ()
    timeout_s: float = 1800.0


@dataclass(frozen=True)
class BenchConfig:
    threads: tuple[int, ...] = (1, 0)     # onnxruntime intra-op threads to time; 0 = all cores
    batches: tuple[int, ...] = (1, 32)
    warmup: int = 50
    runs: int = 300
    accuracy_subset: int = 0    # 0 = the evaluated test set (data.test_subset)
    # onnxruntime graph optimisation levels to time. "all" adds the NCHWc layout transform, which pads channel
    # counts up to the SIMD block (8 or 16): pruned widths that are not multiples of it lose their speedup there.
    # Every level is timed and the best one per artifact is the headline (dense-best / pruned-best).
    optimizations: tuple[str, ...] = ("disable", "basic", "extended", "all")
    devices: tuple[DeviceConfig, ...] = (DeviceConfig(),)


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    seed: int = 0
    device: str = "auto"        # "auto" | "cpu" | "cuda"
    threads: int = 0            # torch intra-op threads for training; 0 = torch default
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    surgery: SurgeryConfig = field(default_factory=SurgeryConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    paper: PaperConfig = field(default_factory=PaperConfig)


CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "train.attack.kind": ("pgd", "fgsm_rs", "none"),
    "prune.method": ("rgsm", "rvsm", "admm", "none"),
    "prune.rgsm_prox": ("hard", "soft"),
    "prune.penalty": ("l0", "l1", "tl1"),
    "prune.sparsity": ("elem", "channel"),
    "train.reset_optimizer": ("never", "epoch"),
    "model.ensemble_impl": ("members", "grouped"),
    "train.precision": ("fp32", "bf16"),
    "prune.groups": ("paper", "coupled"),
    "prune.group_cost": ("macs", "weights"),
    "prune.init": ("finetune", "scratch"),
    "quantize.method": ("minmax", "entropy", "percentile"),
}
NON_NEGATIVE = {"threads", "data.val_size", "data.train_subset", "data.test_subset", "train.attack.steps",
                "train.val_attack_steps", "train.val_subset", "train.checkpoint_every", "train.lr_warmup_epochs", "train.weight_decay", "prune.lambda1",
                "prune.lambda2", "prune.rvsm_lambda", "eval.pgd_steps", "eval.images", "eval.ifgsm_steps", "eval.cw_steps", "eval.cw_kappa",
                "eval.sanity_slack_pt", "eval.sweep_steps", "bench.accuracy_subset", "train.attack.eps_255",
                "eval.eps_255", "bench.warmup"}
POSITIVE = {"train.attack.step_255", "eval.step_255", "export.parity_tol", "prune.zero_tol", "surgery.tol",
            "model.ensemble", "train.epochs", "train.batch_size", "train.val_batch_size", "train.lr", "prune.epochs", "prune.lr",
            "prune.beta", "prune.tl1_a", "prune.rho", "eval.batch_size", "eval.eot_samples", "eval.pgd_restarts", "eval.apgd_steps", "eval.avg_passes",
            "eval.paper_eps_01", "eval.paper_step_01", "eval.cw_lr", "eval.cw_c", "bench.runs", "export.opset",
            "export.parity_draws", "quantize.calibration_images"}


def _type_name(t) -> str:
    return getattr(t, "__name__", str(t))


def _coerce(value, hint, where: str, source: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if float in options and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        for option in options:
            if isinstance(value, option) and not (option in (int, float) and isinstance(value, bool)):
                return value
        raise ConfigError(f"{source}: {where}: expected {' or '.join(_type_name(o) for o in options)}, "
                          f"got {type(value).__name__} ({value!r})")
    if origin is tuple:
        (elem, _) = typing.get_args(hint)
        if dataclasses.is_dataclass(elem):   # an array of tables, e.g. [[bench.devices]]
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{source}: {where}: expected an array of tables, got {type(value).__name__} ({value!r})")
            return tuple(v if isinstance(v, elem) else _build(elem, v, f"{where}[{i}].", source)
                         for i, v in enumerate(value))
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {where}: expected a list of {_type_name(elem)}, got {type(value).__name__} ({value!r})")
        return tuple(_coerce(v, elem, f"{where}[{i}]", source) for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{source}: {where}: expected {_type_name(hint)}, got {type(value).__name__} ({value!r})")
    return value


def _build(cls, data: dict, prefix: str, source: str, overridden: frozenset = frozenset()):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            dotted = prefix + key
            src = "--set" if any(o == dotted or o.startswith(dotted + ".") for o in overridden) else source
            raise ConfigError(f"{src}: unknown key '{prefix}{key}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        hint = hints[f.name]
        where = prefix + f.name
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, data[f.name], where + ".", source, overridden)
        else:
            kwargs[f.name] = _coerce(data[f.name], hint, where, "--set" if where in overridden else source)
    return cls(**kwargs)


# Opsets each exporter really writes (measured with torch 2.14): the dynamo exporter silently moves an opset
# below 18 up to 18; the TorchScript exporter refuses above 23.
OPSETS = {True: (18, 25), False: (7, 23)}


def _validate(cfg: RunConfig, source: str, overridden: frozenset = frozenset()) -> None:
    flat = flatten(cfg)

    def fail(key: str, expected: str, involved: tuple[str, ...] = ()):
        # a rule between keys blames --set when any key it involves came from there
        src = "--set" if key in overridden or any(k in overridden for k in involved) else source
        value = list(flat[key]) if isinstance(flat[key], tuple) else flat[key]
        raise ConfigError(f"{src}: {key}: expected {expected}, got {value!r}")

    for key, value in flat.items():
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            fail(key, "a finite number")
    levels = ("disable", "basic", "extended", "all")
    if not flat["bench.optimizations"] or any(o not in levels for o in flat["bench.optimizations"]):
        fail("bench.optimizations", f"a non-empty list from {', '.join(levels)}")
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            fail(key, f"one of {', '.join(choices)}")
    for key in NON_NEGATIVE:
        if flat[key] < 0:
            fail(key, ">= 0")
    for key in POSITIVE:
        if flat[key] <= 0:
            fail(key, "> 0")
    for key in ("train.attack.eps_255", "eval.eps_255"):
        if not 0 < flat[key] <= 255:
            fail(key, "a radius in (0, 255] (units of 1/255)")
    if cfg.train.attack.kind == "pgd" and cfg.train.attack.step_255 > cfg.train.attack.eps_255:
        fail("train.attack.step_255", f"a step <= train.attack.eps_255 = {cfg.train.attack.eps_255}",
             ("train.attack.eps_255",))
    from .robustness import ATTACKS
    for key, allowed in (("eval.attacks", ATTACKS), ("eval.models", ("dense", "masked", "pruned"))):
        if any(v not in allowed for v in flat[key]) or len(set(flat[key])) != len(flat[key]):
            fail(key, f"distinct names from {', '.join(allowed)}")
    if any(not 0 <= v <= 255 for v in cfg.eval.sweep_eps_255) or list(cfg.eval.sweep_eps_255) != sorted(
            cfg.eval.sweep_eps_255):
        fail("eval.sweep_eps_255", "increasing radii in [0, 255]")
    if not 0 < cfg.eval.paper_eps_01 <= 1 or cfg.eval.paper_step_01 > cfg.eval.paper_eps_01:
        fail("eval.paper_eps_01", f"a radius in (0, 1] >= eval.paper_step_01 = {cfg.eval.paper_step_01}",
             ("eval.paper_step_01",))
    if cfg.eval.step_255 > cfg.eval.eps_255:
        fail("eval.step_255", f"a step <= eval.eps_255 = {cfg.eval.eps_255}", ("eval.eps_255",))
    if not 0 <= cfg.train.momentum < 1:
        fail("train.momentum", "a value in [0, 1)")
    if cfg.train.nesterov and cfg.train.momentum == 0:
        fail("train.nesterov", "false when train.momentum = 0 (Nesterov needs momentum)", ("train.momentum",))
    for key in ("train.lr_gamma", "prune.lr_gamma"):
        if not 0 < flat[key] <= 1:
            fail(key, "a decay factor in (0, 1]")
    if cfg.model.noise_coef < 0:
        fail("model.noise_coef", ">= 0 (0 = no noise)")
    if not 0 < cfg.data.val_size < 50_000:
        fail("data.val_size", "between 1 and 49,999 (the train stage selects its checkpoint on this split)")
    low, high = OPSETS[cfg.export.dynamo]
    if not low <= cfg.export.opset <= high:
        fail("export.opset", f"{low}..{high} with export.dynamo = {str(cfg.export.dynamo).lower()}",
             ("export.dynamo",))
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail("device", '"cpu" or "auto": torch sees no CUDA device here')
    if cfg.train.cuda_graphs and cfg.device == "cpu":
        fail("train.cuda_graphs", 'false with device = "cpu" (CUDA graphs need a CUDA device)', ("device",))
    if not 0 <= cfg.prune.percentile < 100:
        fail("prune.percentile", "a percentile in [0, 100)")
    if cfg.prune.groups == "coupled" and cfg.prune.method != "rgsm":
        fail("prune.groups", f'"paper" unless prune.method = "rgsm" (coupled groups are RGSM channel groups; '
                             f'prune.method is {cfg.prune.method!r})', ("prune.method",))
    if cfg.prune.rgsm_prox == "soft" and cfg.prune.align != 1:
        fail("prune.rgsm_prox", '"hard" when prune.align is not 1 (the group-lasso prox has no aligned variant)',
             ("prune.align",))
    align = cfg.prune.align
    if not (align == "auto" or isinstance(align, int) and align >= 1):
        fail("prune.align", 'a positive integer or "auto"')
    if align != 1 and cfg.prune.groups != "coupled":
        fail("prune.align", f'1 unless prune.groups = "coupled" (paper groups are conv input slices, not whole '
                            f'channels; prune.groups is {cfg.prune.groups!r})', ("prune.groups",))
    for key, minimum in (("bench.threads", 0), ("bench.batches", 1)):
        values = flat[key]
        if not values or any(v < minimum for v in values):
            fail(key, f"a non-empty list of integers >= {minimum}")
    variants = cfg.export.noise_variants
    if "deterministic" not in variants or any(v not in ("deterministic", "stochastic", "per_sample") for v in variants) \
            or len(set(variants)) != len(variants):
        fail("export.noise_variants", 'distinct names from deterministic, stochastic, per_sample, with "deterministic"')
    if not cfg.quantize.op_types or any(o not in ("Conv", "Gemm", "MatMul", "Add") for o in cfg.quantize.op_types):
        fail("quantize.op_types", "a non-empty list from Conv, Gemm, MatMul, Add")
    _validate_devices(cfg, "--set" if any(k.startswith("bench.devices") for k in overridden) else source, levels)
    for key in ("train.lr_milestones", "prune.lr_milestones"):
        ms = flat[key]
        if any(not 0 < m <= 1 for m in ms) or list(ms) != sorted(ms):
            fail(key, "increasing fractions in (0, 1]")
    from models import list_models
    if cfg.model.arch not in list_models():
        fail("model.arch", f"one of {', '.join(list_models())}")


def _validate_devices(cfg: RunConfig, source: str, levels) -> None:
    from .devices import device_name, kind_of
    from .devices.ssh_target import parse_ssh_target

    def fail(i: int, msg: str):
        raise ConfigError(f"{source}: bench.devices[{i}]: {msg}")

    if not cfg.bench.devices:
        raise ConfigError(f'{source}: bench.devices: expected at least one device ([[bench.devices]] target = "host"), '
                          f"got none")
    if not any(d.target == "host" for d in cfg.bench.devices):
        raise ConfigError(f'{source}: bench.devices: expected a "host" device among them (the reference every other '
                          f"device's predictions are compared with, and the headline speed-up), got "
                          f"{[d.target for d in cfg.bench.devices]}")
    seen = set()
    for i, d in enumerate(cfg.bench.devices):
        try:
            if kind_of(d.target) == "ssh":
                parse_ssh_target(d.target)
        except ValueError as e:
            fail(i, f"target: {e}")
        for key, value in (("runs", d.runs), ("warmup", d.warmup), ("images", d.images)):
            if value < 0:
                fail(i, f"{key}: expected >= 0 (0 = bench.{key}), got {value}")
        if any(b < 1 for b in d.batches):
            fail(i, f"batches: expected integers >= 1, got {list(d.batches)}")
        if any(t < 0 for t in d.threads):
            fail(i, f"threads: expected integers >= 0 (0 = all cores), got {list(d.threads)}")
        if any(o not in levels for o in d.optimizations):
            fail(i, f"optimizations: expected names from {', '.join(levels)}, got {list(d.optimizations)}")
        if not d.timeout_s > 0:
            fail(i, f"timeout_s: expected > 0, got {d.timeout_s}")
        name = device_name(d)
        if name in seen:
            fail(i, f"name: expected distinct device names, {name!r} appears twice (set name = ...)")
        seen.add(name)


def flatten(obj, prefix: str = "") -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out.update(flatten(v, prefix + f.name + "."))
        else:
            out[prefix + f.name] = v
    return out


def toml_value(v) -> str:
    """``v`` as TOML, as a config file or ``--set key=VALUE`` takes it back (``[[bench.devices]]`` entries as
    inline tables)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if v != v else ("inf" if v > 0 else "-inf")
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)   # JSON's escapes are TOML's
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if dataclasses.is_dataclass(v):
        return "{" + ", ".join(f"{f.name} = {toml_value(getattr(v, f.name))}" for f in dataclasses.fields(v)) + "}"
    raise TypeError(f"no TOML form for {type(v).__name__}")


def show_lines(cfg) -> list[str]:
    """``pipeline show-config``: one ``key = value`` line per resolved key; a key with no value (TOML has no
    null) as a comment."""
    return [f"# {k} = (not set)" if v is None else f"{k} = {toml_value(v)}" for k, v in flatten(cfg).items()]


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _parse_override(text: str, source: str) -> tuple[list[str], object]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{source}: expected section.key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as `--set prune.init=scratch` is meant as a string
    return key.strip().split("."), value


def load_config(path: str | Path | None, overrides: list[str] = (), *, data: dict | None = None,
                source: str | None = None) -> RunConfig:
    """From a TOML file, or (``data``) from a run's recorded config, then the ``--set`` overrides."""
    source = source or (str(path) if path else "<defaults>")
    data = dict(data) if data is not None else {}
    overridden = set()
    if path is not None:
        p = Path(path)
        try:
            raw = p.read_bytes()
            # utf-8-sig: a BOM (as some Windows editors write) is accepted and dropped
            data = tomllib.loads(raw.decode("utf-8-sig"))
        except FileNotFoundError:
            raise ConfigError(f"{source}: file not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{source}: is a directory, expected a TOML file") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{source}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); "
                              "save the file as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"{source}: cannot read: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source}: invalid TOML: {e}") from None
        if not data:
            raise ConfigError(f"{source}: empty config; expected at least name and the [model], [train] and "
                              "[prune] settings (defaults alone are the 200 + 200-epoch paper recipe)")
    for text in overrides:
        keys, value = _parse_override(text, "--set")
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: '{k}' is not a section")
        node[keys[-1]] = value
        overridden.add(".".join(keys))
    cfg = _build(RunConfig, data, "", source, frozenset(overridden))
    _validate(cfg, source, frozenset(overridden))
    return cfg
