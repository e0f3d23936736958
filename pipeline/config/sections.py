"""The config's sections: one frozen dataclass each, with its defaults and a ``check()`` of its own values
(``pipeline/core/checks.py``). Rules between sections are ``RunConfig.check()``. Units are in the names
(``eps_255`` = 1/255 pixel units, ``paper_eps_01`` = [0, 1] units)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..catalog import artifacts
from ..catalog.attacks import ATTACKS
from ..catalog.devices import DEVICE_KINDS, QEMU_CPUS, check_target, device_name, kind_of
from ..catalog.sparsifiers import SPARSIFIERS, method_names
from ..core.checks import Invalid, fractions, non_negative, one_of, positive, require

LEVELS = ("disable", "basic", "extended", "all")   # onnxruntime graph optimisation levels
BUDGETS = ("none", "macs", "params", "latency")
SEED_LIMIT = 2**31          # seeds in [0, 2**31): every derived stream (seed + offset, numpy's rng) takes them
# datasets whose training-set size is known before loading (the rest are checked when the train stage loads them)
FIXED_TRAIN_SIZE = {"cifar10": 50_000, "cifar100": 50_000, "svhn": 73_257}


def _seed(section, name: str) -> None:
    require(0 <= getattr(section, name) < SEED_LIMIT, name, f"an integer in [0, {SEED_LIMIT:,})")


def path_problem(path: str) -> str | None:
    """What is wrong with a path a user wrote (None if nothing): a ``~user`` that names no user here."""
    from pathlib import Path

    if path.startswith("~"):
        head = path.split("/", 1)[0]
        try:
            expanded = Path(head).expanduser()
        except RuntimeError:
            expanded = Path(head)
        if str(expanded).startswith("~"):
            return f"{head!r} names no user of this machine"
    return None


class Sections(Mapping):
    """An immutable name -> settings mapping whose entries are TOML tables inline in their parent section: the
    ``[prune.<method>]`` tables, one per registered sparsifier."""

    def __init__(self, items):
        self._items = dict(items)

    def __getitem__(self, name):
        return self._items[name]

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def __hash__(self):
        return hash(tuple(self._items.items()))

    def __repr__(self):
        return f"Sections({self._items!r})"


def table_sections(registry):
    """A field holding every entry's settings (defaults here; the loader reads ``[section.<name>]`` tables)."""
    return field(default_factory=lambda: Sections({e.name: e.settings() for e in registry.entries() if e.settings}),
                 metadata={"inline_table": registry})


DATASETS = ("cifar10", "cifar100", "svhn", "imagefolder", "npz")


@dataclass(frozen=True)
class DataConfig:
    # "cifar10" | "cifar100" | "svhn" (torchvision's files, downloaded when allowed) | "imagefolder"
    # (root/train/<class>/* and root/test/<class>/*, the user's own images) | "npz" (root = a .npz file with uint8
    # x_train, y_train, x_test, y_test). Image size and class count come from the data.
    dataset: str = "cifar10"
    # where the dataset lives: cifar10 a folder holding cifar-10-batches-py, cifar100 cifar-100-python, svhn
    # train_32x32.mat + test_32x32.mat; "" = $PIPELINE_DATA_ROOT, else ~/.cache/pipeline/data
    root: str = ""
    image_size: int = 0         # imagefolder: resize every image to this square size once (0 = keep; sizes must agree)
    download: bool = True       # torchvision download when the files are absent
    val_size: int = 5000        # held out of the 50k training images (paper: 45k/5k)
    train_subset: int = 0       # 0 = all remaining training images
    test_subset: int = 0        # 0 = all 10k test images; else a seeded subset
    split_seed: int = 0

    def check(self) -> None:
        one_of(self, "dataset", DATASETS)
        non_negative(self, "train_subset", "test_subset", "image_size")
        require(self.image_size == 0 or self.dataset == "imagefolder", "image_size",
                f'0 unless data.dataset = "imagefolder" (the other datasets keep their size; data.dataset is '
                f"{self.dataset!r})", ("dataset",))
        require(self.dataset != "npz" or bool(self.root), "root", 'the path of the .npz file with data.dataset = "npz"',
                ("dataset",))
        n = FIXED_TRAIN_SIZE.get(self.dataset)
        require(0 < self.val_size < (n or float("inf")), "val_size",
                (f"between 1 and {n - 1:,}" if n else ">= 1")
                + " (the train stage selects its checkpoint on this split)")
        _seed(self, "split_seed")
        problem = path_problem(self.root)
        require(problem is None, "root", f"a folder path ({problem})")


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
    # Per-layer widths, to build a thin network directly (e.g. a pruned run's final widths, trained from scratch by
    # `pipeline baseline`): module name -> [in, out] of a conv or linear, [n] of a BN, [] = removed (a residual
    # branch). Empty: the registry's dense widths.
    widths: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # Keyword arguments of the builder: a registry model's own (beyond ensemble, noise_coef, normalize) or, for
    # arch = "package.module:function", everything the user's function takes (num_classes is passed when it
    # takes one and it is not given here).
    kwargs: dict[str, object] = field(default_factory=dict)

    def check(self) -> None:
        from models import list_models, model_entry
        from models.external import external_problem

        if ":" in self.arch:   # the user's builder: importable now, called (output shape) when the data is known
            problem = external_problem(self.arch)
            require(problem is None, "arch", f'"package.module:function" naming an importable builder ({problem})')
            require(self.ensemble == 1, "ensemble", f"1 with the user's builder {self.arch} (ensembles are of registry "
                    "models)", ("arch",))
        else:
            require(self.arch in list_models(), "arch", f"one of {', '.join(list_models())}, or "
                    '"package.module:function" for a builder of your own')
        positive(self, "ensemble")
        require(self.noise_coef >= 0, "noise_coef", ">= 0 (0 = no noise)")
        family = "external" if ":" in self.arch else model_entry(self.arch).metadata.get("family")
        require(self.ensemble_impl == "members" or family == "preact_resnet", "ensemble_impl",
                f'"members" for {self.arch} (the grouped ensemble is built for the preact_resnet models)', ("arch",))
        noise_sites = ":" not in self.arch and model_entry(self.arch).metadata.get("noise_sites", False)
        require(self.noise_coef == 0 or noise_sites, "noise_coef",
                f"0 for {self.arch}: EnResNet's noise is defined after the residual sums of the preact_resnet "
                "models only", ("arch",))
        one_of(self, "ensemble_impl", ("members", "grouped"))
        if self.widths:
            require(self.ensemble_impl == "members", "widths", 'no widths with model.ensemble_impl = "grouped" '
                    "(the grouped ensemble needs equal members)", ("ensemble_impl",))
            problem = widths_problem(self)
            require(problem is None, "widths", f"per-layer widths that fit {self.arch} ({problem})")


def widths_problem(model) -> str | None:
    """What is wrong with ``model.widths`` for its architecture (None if it builds and runs an image)."""
    import torch

    from models import build_from_description

    kwargs = dict(model.kwargs) if ":" in model.arch else {
        "ensemble": model.ensemble, "noise_coef": model.noise_coef, "normalize": model.normalize, **model.kwargs}
    desc = {"arch": model.arch, "kwargs": kwargs, "shapes": {k: (list(v) if v else None) for k, v in model.widths.items()}}
    try:
        net = build_from_description(desc).eval()
        with torch.no_grad():
            net(torch.zeros(1, 3, 32, 32))
    except (AttributeError, TypeError, ValueError, IndexError, RuntimeError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return None


def _radius(section, name: str) -> None:
    require(0 < getattr(section, name) <= 255, name, "a radius in (0, 255] (units of 1/255)")


@dataclass(frozen=True)
class AttackConfig:
    """Attack used *during training* to craft adversarial examples."""
    kind: str = "pgd"           # "pgd" | "fgsm_rs" | "none" (natural training)
    eps_255: float = 8.0
    step_255: float = 2.0       # PGD step; fgsm_rs always steps 1.25*eps (Wong et al., 2020)
    steps: int = 10             # PGD iterations (paper: 10); ignored for fgsm_rs
    random_start: bool = True

    def check(self) -> None:
        one_of(self, "kind", ("pgd", "fgsm_rs", "none"))
        non_negative(self, "steps")
        positive(self, "step_255")
        _radius(self, "eps_255")
        if self.kind == "pgd":
            require(self.step_255 <= self.eps_255, "step_255", f"a step <= train.attack.eps_255 = {self.eps_255}",
                    ("eps_255",))


def _decay(section, name: str) -> None:
    require(0 < getattr(section, name) <= 1, name, "a decay factor in (0, 1]")


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
    # CUDA device; pipeline/train/loop.py TrainStep). Not part of any stage key: the same kernels in the same order.
    cuda_graphs: bool = False

    def check(self) -> None:
        positive(self, "epochs", "batch_size", "val_batch_size", "lr")
        non_negative(self, "val_attack_steps", "val_subset", "checkpoint_every", "lr_warmup_epochs", "weight_decay")
        one_of(self, "reset_optimizer", ("never", "epoch"))
        one_of(self, "precision", ("fp32", "bf16"))
        require(0 <= self.momentum < 1, "momentum", "a value in [0, 1)")
        require(not (self.nesterov and self.momentum == 0), "nesterov",
                "false when train.momentum = 0 (Nesterov needs momentum)", ("momentum",))
        _decay(self, "lr_gamma")
        fractions(self, "lr_milestones")
        require(self.lr_warmup_epochs <= self.epochs, "lr_warmup_epochs",
                f"at most train.epochs = {self.epochs} (the warm-up is part of the stage's epochs)", ("epochs",))


@dataclass(frozen=True)
class PruneConfig:
    # A sparsifier of pipeline/catalog/sparsifiers.py ("rgsm" channel groups, "rvsm" unstructured, "admm" the
    # paper's baseline), or "none" (the train checkpoint passes through unchanged: a dense baseline row). Each
    # sparsifier's own settings are its [prune.<method>] table, e.g. [prune.rgsm] lambda1 = 0.1.
    method: str = "rgsm"
    # What is pruned -- "paper": groups are conv input-channel slices (the paper's RGSM). "coupled": one group per
    # removable channel (DependencyGraph: producers' filters, BN entries, every reader's slice), so sparsity =
    # removability (methods registered with coupled=True: RGSM).
    groups: str = "paper"
    # Kept channels per coupled family: a multiple of this (never below it), so pruned widths match the SIMD
    # block of the target's conv kernels. "auto" = the host's onnxruntime NCHWc block (pipeline/devices/hardware.py).
    align: int | str = 1
    # Coupled groups differ in size; each group's lambda1 is scaled by what it costs relative to an average paper
    # group: "macs" (compute per image its removal saves -- what latency follows) or "weights" (parameters).
    group_cost: str = "macs"
    # A budget instead of lambda1 (coupled groups): the prox keeps the widths that lose the least weight energy while
    # the pruned network is `target` times cheaper than the dense one in MACs, parameters or measured latency on
    # `budget_device` (a [[bench.devices]] name; "" = the host), at every projection. "none": lambda1 decides.
    budget: str = "none"
    target: float = 2.0         # dense cost / pruned cost, > 1
    budget_device: str = ""
    budget_every: int = 1       # re-solve the budget's layout every this many steps (1: exact; big nets: ~20)
    init: str = "finetune"      # "finetune" (start from the train checkpoint) | "scratch" (paper's from-scratch mode)
    epochs: int = 200
    lr: float = 0.1
    lr_milestones: tuple[float, ...] = (0.4, 0.6, 0.8)
    lr_gamma: float = 0.1
    zero_tol: float = 1e-15     # paper: a group counts as zero when its l2 norm is below this
    methods: Sections = table_sections(SPARSIFIERS)

    @property
    def settings(self):
        """The selected method's settings (None for "none")."""
        return self.methods.get(self.method)

    def check(self) -> None:
        one_of(self, "method", method_names())
        one_of(self, "groups", ("paper", "coupled"))
        one_of(self, "group_cost", ("macs", "weights"))
        one_of(self, "init", ("finetune", "scratch"))
        positive(self, "epochs", "lr", "zero_tol")
        _decay(self, "lr_gamma")
        fractions(self, "lr_milestones")
        coupled = [e.name for e in SPARSIFIERS.entries() if e.meta.get("coupled")]
        names = " or ".join('"%s"' % n for n in coupled)
        require(self.groups != "coupled" or self.method in coupled, "groups",
                f'"paper" unless prune.method = {names} (coupled groups are channel groups; prune.method is '
                f"{self.method!r})", ("method",))
        align = self.align
        require(align == "auto" or isinstance(align, int) and align >= 1, "align", 'a positive integer or "auto"')
        require(align == 1 or self.groups == "coupled", "align",
                f'1 unless prune.groups = "coupled" (paper groups are conv input slices, not whole channels; '
                f"prune.groups is {self.groups!r})", ("groups",))
        one_of(self, "budget", BUDGETS)
        positive(self, "budget_every")
        if self.budget != "none":
            require(self.groups == "coupled", "budget",
                    f'"none" unless prune.groups = "coupled" (a budget prices whole removable channels; prune.groups '
                    f"is {self.groups!r})", ("groups",))
            require(self.target > 1, "target", "a ratio > 1 (dense cost / pruned cost)", ("budget",))
        rgsm = self.methods.get("rgsm")
        if rgsm is not None and rgsm.prox == "soft" and (align != 1 or self.budget != "none"):
            raise Invalid("rgsm.prox", '"hard" when prune.align is not 1 or prune.budget is set (the group-lasso '
                          "prox has no aligned or budgeted variant)", ("align", "budget"))


@dataclass(frozen=True)
class FinetuneConfig:
    """Stage ``finetune``: adversarial training of the physically pruned network (train.* recipe); 0 epochs = off."""
    epochs: int = 0
    lr: float = 0.01
    lr_milestones: tuple[float, ...] = (0.5,)
    lr_gamma: float = 0.1

    def check(self) -> None:
        non_negative(self, "epochs")
        positive(self, "lr")
        _decay(self, "lr_gamma")
        fractions(self, "lr_milestones")


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
    # "full": every attack on every correctly classified image (per-attack numbers, every sanity ordering);
    # "cascade" (AutoAttack's convention): cheapest first, each attack only on the images no earlier attack broke --
    # the same worst case for a fraction of the time; its columns read "robust after this attack and all before".
    mode: str = "full"
    # How a model with test-time noise is attacked: "stochastic" (noise as trained: the paper's single pass),
    # "noise_off" (the deterministic function the ONNX graph computes), "per_sample" (noise scale per image: the
    # per_sample artifact). A model without noise is evaluated noise off only.
    noise_modes: tuple[str, ...] = ("stochastic", "noise_off", "per_sample")
    sweep_eps_255: tuple[float, ...] = (0.0, 2.0, 4.0, 8.0)   # sanity: PGD accuracy must not rise with eps
    sweep_steps: int = 10
    sanity_slack_pt: float = 1.0  # least slack for comparisons of stochastic numbers (percentage points)

    def check(self) -> None:
        for name, allowed in (("attacks", ATTACKS.names()), ("models", tuple(artifacts.SOURCES))):
            values = getattr(self, name)
            require(all(v in allowed for v in values) and len(set(values)) == len(values), name,
                    f"distinct names from {', '.join(allowed)}")
        require(bool(self.attacks), "attacks", "at least one attack (an evaluation of none scores nothing)")
        require(bool(self.models), "models", "at least one model (an evaluation of none scores nothing)")
        non_negative(self, "images", "cw_kappa", "sanity_slack_pt")
        positive(self, "pgd_steps", "ifgsm_steps", "cw_steps", "sweep_steps")
        one_of(self, "mode", ("full", "cascade"))
        require(bool(self.noise_modes) and all(m in artifacts.NOISE_OF_MODE for m in self.noise_modes)
                and len(set(self.noise_modes)) == len(self.noise_modes), "noise_modes",
                f"distinct names from {', '.join(artifacts.NOISE_OF_MODE)}, at least one")
        positive(self, "step_255", "batch_size", "eot_samples", "pgd_restarts", "apgd_steps", "avg_passes",
                 "paper_eps_01", "paper_step_01", "cw_lr", "cw_c")
        _radius(self, "eps_255")
        require(all(0 <= v <= 255 for v in self.sweep_eps_255) and list(self.sweep_eps_255) == sorted(
            self.sweep_eps_255), "sweep_eps_255", "increasing radii in [0, 255]")
        require(0 < self.paper_eps_01 <= 1 and self.paper_step_01 <= self.paper_eps_01, "paper_eps_01",
                f"a radius in (0, 1] >= eval.paper_step_01 = {self.paper_step_01}", ("paper_step_01",))
        require(self.step_255 <= self.eps_255, "step_255", f"a step <= eval.eps_255 = {self.eps_255}", ("eps_255",))


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

    def check(self) -> None:
        # a channel is removed when its weights' norm is below tol: anything larger removes live channels
        require(0 < self.tol <= 1e-3, "tol", "a tolerance in (0, 1e-3] (a channel whose weights' norm is below it "
                "counts as removed)")


# Opsets each exporter really writes (measured with torch 2.14): the dynamo exporter silently moves an opset
# below 18 up to 18; the TorchScript exporter refuses above 23.
OPSETS = {True: (18, 25), False: (7, 23)}


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 18
    dynamo: bool = True
    simplify: bool = True
    parity_tol: float = 1e-4
    # Deployable noise variants (pipeline/catalog/artifacts.py). "deterministic" (noise removed) is always written;
    # "stochastic" keeps EnResNet's noise in the graph as trained (std over the whole batch tensor), "per_sample"
    # computes each image's noise scale from that image alone. With model.noise_coef = 0 only "deterministic" is made.
    noise_variants: tuple[str, ...] = ("deterministic", "stochastic", "per_sample")
    parity_draws: int = 200     # noisy passes per side for the statistical torch-vs-ORT check of noisy graphs

    def check(self) -> None:
        positive(self, "parity_tol", "opset")
        require(self.parity_draws >= 2, "parity_draws", ">= 2 (the statistical parity check needs a spread)")
        low, high = OPSETS[self.dynamo]
        require(low <= self.opset <= high, "opset", f"{low}..{high} with export.dynamo = {str(self.dynamo).lower()}",
                ("dynamo",))
        variants = self.noise_variants
        require("deterministic" in variants and all(v in artifacts.NOISE_OF_VARIANT for v in variants)
                and len(set(variants)) == len(variants), "noise_variants",
                'distinct names from deterministic, stochastic, per_sample, with "deterministic"')


QUANT_METHODS = ("ptq", "qat", "binary_relax", "admm")
QUANT_BITS = {"ptq": (8,), "qat": (8,), "binary_relax": (1, 2, 4), "admm": (1, 2, 4, 8)}
CALIBRATIONS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class QuantizeConfig:
    """Stage ``quantize``: onnxruntime's static int8 (QDQ) of the deterministic dense and pruned graphs, always;
    with ``method`` also a trained quantized model (pipeline/stages/quantize.py):

    - "qat": quantization-aware adversarial training of the int8 graph itself (its torch twin, export/qdq_twin.py:
      int8 per-channel weights, uint8 activations at the calibrated ranges), written back as ``<model>_qat_int8``;
    - "binary_relax": Binary-Relax (Li, Wang, Xin 2020; paper README §5) on the torch model, every conv weight on a
      ``bits`` grid (4: 4-bit, 2: ternary, 1: binary), float activations: ``<model>_br``;
    - "admm": the weights ADMM left on the grid (prune.method = "admm" with prune.admm.bits): ``<model>_admm_q``."""
    enabled: bool = True
    method: str = "ptq"
    bits: int = 8
    models: tuple[str, ...] = ("dense", "pruned")   # the models method trains (ptq quantizes every deployed one)
    calibration: str = "minmax"     # onnxruntime CalibrationMethod: "minmax" | "entropy" | "percentile"
    calibration_images: int = 256   # seeded training images (never test) for the activation ranges
    per_channel: bool = True        # per-output-channel weight scales
    op_types: tuple[str, ...] = ("Conv", "Gemm", "MatMul", "Add")
    # training (qat, binary_relax): the train section's attack and optimizer, these epochs and learning rates, and
    # the loss natural_weight·CE(x) + adversarial_weight·CE(x_adv) (Binary-Relax's trade-off loss: 1 and 8)
    epochs: int = 2
    lr: float = 0.001           # fine-tuning a trained model with a loss 9x the plain CE (the trade-off weights)
    lr_milestones: tuple[float, ...] = (0.5,)
    natural_weight: float = 1.0
    adversarial_weight: float = 8.0
    # Binary-Relax: relaxed weights (eta·Q(w) + w)/(1 + eta) for relax_epochs epochs, eta ×eta_growth per epoch, then Q(w)
    relax_epochs: int = 1
    eta0: float = 1.0
    eta_growth: float = 1.05
    # grid weights (binary_relax, admm) in the graph: "int4" (opset 21 DequantizeLinear), "int8" codes, or "auto"
    # (int4 when bits <= 4)
    weight_format: str = "auto"

    def check(self) -> None:
        if self.method in CALIBRATIONS:
            raise Invalid("method", f"one of {', '.join(QUANT_METHODS)} ({self.method!r} is a calibration method: "
                          f'it moved to quantize.calibration = "{self.method}")')
        one_of(self, "method", QUANT_METHODS)
        require(self.bits in QUANT_BITS[self.method], "bits",
                f"{' or '.join(map(str, QUANT_BITS[self.method]))} with method = {self.method!r}", ("method",))
        require(self.enabled or self.method == "ptq", "method",
                f'"ptq" with quantize.enabled = false (nothing is quantized, so there is no {self.method} model)',
                ("enabled",))
        require(bool(self.models) and len(set(self.models)) == len(self.models)
                and all(m in artifacts.DEPLOYED for m in self.models), "models",
                f"a non-empty list from {', '.join(artifacts.DEPLOYED)} without repeats")
        positive(self, "calibration_images", "epochs", "lr", "eta0")
        one_of(self, "calibration", CALIBRATIONS)
        require(bool(self.op_types) and all(o in ("Conv", "Gemm", "MatMul", "Add") for o in self.op_types),
                "op_types", "a non-empty list from Conv, Gemm, MatMul, Add")
        fractions(self, "lr_milestones")
        non_negative(self, "natural_weight", "relax_epochs")
        positive(self, "adversarial_weight")
        require(self.relax_epochs <= self.epochs, "relax_epochs", f"at most quantize.epochs = {self.epochs}",
                ("epochs",))
        require(self.eta_growth >= 1, "eta_growth", ">= 1 (eta grows toward the pure quantized weights)")
        one_of(self, "weight_format", ("auto", "int4", "int8"))
        require(self.weight_format != "int4" or self.bits <= 4, "weight_format",
                f'"int8" or "auto" for {self.bits}-bit weights (int4 holds codes -8..7)', ("bits",))


MOBILE_LEVELS = ("disable", "basic", "extended", "layout", "all")   # onnxruntime's levels, named as its .ort tool does


@dataclass(frozen=True)
class MobileConfig:
    """Stage ``mobile``: every deterministic and quantized artifact also in onnxruntime's mobile format (``.ort``),
    one required_operators.config for them all, and onnxruntime's NNAPI / CoreML verdict per artifact
    (export/mobile.py; the options of ``python -m onnxruntime.tools.convert_onnx_models_to_ort``)."""
    enabled: bool = True
    # "fixed": every optimization of the level baked into the file (the CPU provider); "runtime": basic ones applied,
    # the others saved and replayed at load time, so that NNAPI / CoreML see the nodes before fusion
    optimization_style: str = "fixed"
    optimization_level: str = "all"     # graph optimizations applied before saving (the tool's default: all)
    # "arm": no NCHWc layout (x86-only kernels), int8 QDQ kept as int8 ops; "amd64": with NCHWc, for x86 only
    target_platform: str = "arm"

    def check(self) -> None:
        one_of(self, "optimization_style", ("fixed", "runtime"))
        one_of(self, "optimization_level", MOBILE_LEVELS)
        one_of(self, "target_platform", ("arm", "amd64"))


@dataclass(frozen=True)
class DeviceConfig:
    """One ``[[bench.devices]]`` entry: where the ONNX artifacts are timed (pipeline/catalog/devices.py)."""
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

    def problem(self) -> str | None:
        """What is wrong with this entry, as ``key: expected ..., got ...`` (None if nothing)."""
        try:
            check_target(self.target)
        except ValueError as e:
            return f"target: {e}"
        if kind_of(self.target) == "aarch64-emu" and self.qemu_cpu not in QEMU_CPUS:
            return f"qemu_cpu: expected one of {', '.join(QEMU_CPUS)}, got {self.qemu_cpu!r}"
        if path_problem(self.root):
            return f"root: expected a folder path ({path_problem(self.root)}), got {self.root!r}"
        for key in ("runs", "warmup", "images"):
            if getattr(self, key) < 0:
                return f"{key}: expected >= 0 (0 = bench.{key}), got {getattr(self, key)}"
        if any(b < 1 for b in self.batches):
            return f"batches: expected integers >= 1, got {list(self.batches)}"
        if any(t < 0 for t in self.threads):
            return f"threads: expected integers >= 0 (0 = all cores), got {list(self.threads)}"
        if any(o not in LEVELS for o in self.optimizations):
            return f"optimizations: expected names from {', '.join(LEVELS)}, got {list(self.optimizations)}"
        if not self.timeout_s > 0:
            return f"timeout_s: expected > 0, got {self.timeout_s}"
        return None


@dataclass(frozen=True)
class BenchConfig:
    threads: tuple[int, ...] = (1, 0)     # onnxruntime intra-op threads to time; 0 = all cores
    batches: tuple[int, ...] = (1, 32)
    warmup: int = 50
    runs: int = 300             # rounds per setting (every artifact and level once per round, interleaved) ...
    # ... or fewer: > 0 stops a setting's rounds after this many seconds, never below 30 rounds (p50/p90 from at
    # least 30 samples each; p99 then is about their largest). 0 = always `runs` rounds.
    seconds: float = 0.0
    accuracy_subset: int = 0    # 0 = the evaluated test set (data.test_subset)
    # onnxruntime graph optimisation levels to time. "all" adds the NCHWc layout transform, which pads channel
    # counts up to the SIMD block (8 or 16): pruned widths that are not multiples of it lose their speedup there.
    # Every level is timed and the best one per artifact is the headline (dense-best / pruned-best).
    optimizations: tuple[str, ...] = ("disable", "basic", "extended", "all")
    devices: tuple[DeviceConfig, ...] = (DeviceConfig(),)

    def check(self) -> None:
        require(bool(self.optimizations) and all(o in LEVELS for o in self.optimizations), "optimizations",
                f"a non-empty list from {', '.join(LEVELS)}")
        non_negative(self, "accuracy_subset", "warmup", "seconds")
        positive(self, "runs")
        for name, minimum in (("threads", 0), ("batches", 1)):
            values = getattr(self, name)
            require(bool(values) and all(v >= minimum for v in values), name,
                    f"a non-empty list of integers >= {minimum}")
        if not self.devices:
            raise Invalid("devices", 'expected at least one device ([[bench.devices]] target = "host"), got none',
                          plain=True)
        if not any(d.target == "host" for d in self.devices):
            raise Invalid("devices", 'expected a "host" device among them (the reference every other device\'s predictions '
                          f"are compared with, and the headline speed-up), got {[d.target for d in self.devices]}",
                          plain=True)
        seen = set()
        for i, d in enumerate(self.devices):
            problem = d.problem()
            name = device_name(d)
            if problem is None and name in seen:
                problem = f"name: expected distinct device names, {name!r} appears twice (set name = ...)"
            if problem is not None:
                raise Invalid(f"devices[{i}]", problem, plain=True)
            seen.add(name)


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
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    surgery: SurgeryConfig = field(default_factory=SurgeryConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    mobile: MobileConfig = field(default_factory=MobileConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    paper: PaperConfig = field(default_factory=PaperConfig)

    def check(self) -> None:
        """Rules of the top-level keys and between sections (each section checks its own values first)."""
        one_of(self, "device", ("auto", "cpu", "cuda"))
        non_negative(self, "threads")
        _seed(self, "seed")
        n_train = FIXED_TRAIN_SIZE.get(self.data.dataset)
        require(n_train is None or n_train - self.data.val_size >= self.train.batch_size, "data.val_size",
                f"at most {n_train or 0:,} - train.batch_size = {(n_train or 0) - self.train.batch_size:,} (the "
                "images left train the model)", ("train.batch_size",))
        if self.prune.method != "none":
            require(self.train.lr_warmup_epochs <= self.prune.epochs, "train.lr_warmup_epochs",
                    f"at most prune.epochs = {self.prune.epochs} (the prune stage warms up too)", ("prune.epochs",))
        if self.device == "cuda":
            import torch

            require(torch.cuda.is_available(), "device", '"cpu" or "auto": torch sees no CUDA device here')
        require(not (self.train.cuda_graphs and self.device == "cpu"), "train.cuda_graphs",
                'false with device = "cpu" (CUDA graphs need a CUDA device)', ("device",))
        p = self.prune
        if p.budget == "latency":
            from models import supports_latency_budget

            require(supports_latency_budget(self.model.arch), "prune.budget",
                    f'"macs" or "params" for {self.model.arch} (the latency table is measured for the preact_resnet '
                    'blocks)', ("model.arch",))
            names = {device_name(d): d for d in self.bench.devices}
            device = budget_device(self)
            require(device is not None, "prune.budget_device",
                    f"a device name of bench.devices ({', '.join(names)}) or \"\" for the host", ("bench.devices",))
            require(not DEVICE_KINDS[kind_of(device.target)].meta.get("emulated"), "prune.budget_device",
                    f"a device whose timings are latencies: {device_name(device)!r} is emulated (its timings measure "
                    'the emulator); use prune.budget = "macs" there', ("prune.budget", "bench.devices"))
        q = self.quantize
        # asked for explicitly, int4 codes and .ort files exclude each other ("auto" ships those graphs without .ort)
        require(not (self.mobile.enabled and q.weight_format == "int4" and q.method in ("binary_relax", "admm")),
                "quantize.weight_format", '"auto" or "int8" with mobile.enabled = true (onnxruntime\'s .ort format has '
                'no INT4 tensors; "auto" writes int4 and skips their .ort, "int8" stores the same codes as int8), or '
                "set mobile.enabled = false", ("mobile.enabled",))
        if q.method == "admm":
            bits = p.methods["admm"].bits
            require(p.method == "admm" and bits == q.bits, "quantize.method",
                    f'"admm" only with prune.method = "admm" and prune.admm.bits = quantize.bits = {q.bits} (the '
                    f"grid is ADMM's projection; prune.method is {p.method!r}, prune.admm.bits {bits})",
                    ("prune.method", "prune.admm.bits"))


def budget_device(cfg) -> DeviceConfig | None:
    """The [[bench.devices]] entry a latency budget is measured on: prune.budget_device by name, "" = the host."""
    wanted = cfg.prune.budget_device
    for d in cfg.bench.devices:
        if (device_name(d) == wanted) if wanted else d.target == "host":
            return d
    return None
