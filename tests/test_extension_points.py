"""docs/architecture.md's recipes, done for real: a toy attack and a toy sparsifier, each in a module of its own plus
one registration, reach the config, the stages, the code fingerprints and the report without touching anything
else."""
import sys
import textwrap

import pytest

from pipeline.catalog.attacks import ATTACKS
from pipeline.catalog.sparsifiers import SPARSIFIERS
from pipeline.config import ConfigError, load_config, show_lines

TOY = textwrap.dedent('''
    """A toy attack and a toy sparsifier, outside the project."""
    import dataclasses
    from dataclasses import dataclass

    import torch

    from pipeline.algorithms.attacks import uniform_like
    from pipeline.core.checks import require


    def sign_noise(model, x, y, *, eps, generator=None):
        """A random corner of the eps-ball: a (weak) attack that needs no gradient."""
        noise = (uniform_like(x, generator) < 0.5).to(x) * 2 - 1
        return (x + eps * noise).clamp(0, 1)


    @dataclass(frozen=True)
    class MagnitudeSettings:
        fraction: float = 0.5       # share of each conv kernel zeroed at every epoch end

        def check(self):
            require(0 < self.fraction < 1, "fraction", "a share in (0, 1)")

        def kwargs(self):
            return dataclasses.asdict(self)


    class Magnitude:
        """Zero the smallest ``fraction`` of every kernel at each epoch end (no relaxation)."""

        def __init__(self, weights, *, fraction):
            self.weights, self.fraction, self.projections = list(weights), fraction, 0

        def before_batch(self):
            pass

        def regularize(self):
            pass

        def pull(self, lr):
            pass

        @torch.no_grad()
        def end_epoch(self, last=False):
            for w in self.weights:
                k = int(self.fraction * w.numel())
                if k:
                    w[w.abs() <= w.abs().flatten().kthvalue(k).values] = 0
            self.projections += 1

        def state_dict(self):
            return {"fraction": self.fraction, "projections": self.projections}

        def load_state_dict(self, state):
            self.fraction, self.projections = state["fraction"], state["projections"]

        def describe(self):
            return f"magnitude pruning of {len(self.weights)} kernels, {self.fraction:.0%} each"
''')


@pytest.fixture
def toy(tmp_path, monkeypatch):
    (tmp_path / "toy_extension.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import toy_extension

    # the two registrations -- everything else is the toy module itself
    ATTACKS.register("sign_noise", "toy_extension:sign_noise", family="strong",
                     params=lambda e: {"eps": e.eps_255 / 255})
    SPARSIFIERS.register("magnitude", "toy_extension:Magnitude", settings=toy_extension.MagnitudeSettings,
                         groups="kernels")
    yield
    ATTACKS.unregister("sign_noise")
    SPARSIFIERS.unregister("magnitude")
    sys.modules.pop("toy_extension", None)


CHEAP = ["data.train_subset=128", "data.val_size=64", "data.test_subset=64", "train.epochs=1", "prune.epochs=1",
         "train.attack.steps=1", "train.val_attack_steps=1", 'eval.models=["dense", "pruned"]', "eval.sweep_steps=1",
         'eval.attacks=["fgsm", "ifgsm", "sign_noise"]', "eval.ifgsm_steps=2", 'eval.noise_modes=["stochastic", "noise_off"]',
         'export.noise_variants=["deterministic"]', "quantize.enabled=false", "bench.runs=3", "bench.warmup=1",
         'bench.optimizations=["all"]', "bench.batches=[1]", "bench.threads=[1]",
         "prune.method=magnitude", "prune.magnitude.fraction=0.3"]


def test_toy_attack_and_sparsifier_reach_config_stages_and_report(toy, cifar_root, tmp_path):
    from pipeline.report import write_report
    from pipeline.run.fingerprint import closure
    from pipeline.run.runner import run_pipeline
    from pipeline.stages import STAGES, evaluate, prune

    smoke = "configs/smoke.toml"
    cfg = load_config(smoke, CHEAP)
    assert "prune.magnitude.fraction = 0.3" in show_lines(cfg)
    with pytest.raises(ConfigError, match=r"--set: prune\.magnitude\.fraction: expected a share in \(0, 1\), got 1\.5"):
        load_config(smoke, [*CHEAP, "prune.magnitude.fraction=1.5"])
    with pytest.raises(ConfigError, match="unknown key 'prune.magnitude.share'"):
        load_config(smoke, [*CHEAP, "prune.magnitude.share=0.2"])
    # the stages that load them by name cover their code
    assert "toy_extension" in closure(*prune.STAGE.code_modules)
    assert "toy_extension" in closure(*evaluate.STAGE.code_modules)

    manifest = run_pipeline(cfg, tmp_path / "run", STAGES, log=lambda m: None)
    pruned = manifest["stages"]["prune"]["metrics"]
    assert pruned["method"] == "magnitude" and pruned["sparsifier"] == {"fraction": 0.3, "projections": 1}
    assert 29.0 <= pruned["weight_sparsity"] <= 31.0          # 30 % of every kernel, ties aside
    attacks = manifest["stages"]["eval"]["metrics"]["models"]["pruned"]["noise_off"]["attacks"]
    assert attacks["sign_noise"]["key"] == "sign_noise[eps=0.0313725]"
    assert attacks["sign_noise"]["accuracy"] <= manifest["stages"]["eval"]["metrics"]["models"]["pruned"][
        "noise_off"]["natural"]
    report = write_report(tmp_path / "run", manifest)
    md = (tmp_path / "run" / "report.md").read_text()
    strong_header = next(line for line in md.split("## Robustness: strong attacks")[1].splitlines()
                         if line.startswith("| model | mode |"))
    assert strong_header.startswith("| model | mode | sign_noise | worst case")   # its column, read from the table
    assert any(c["check"] == "sign_noise_not_above_ifgsm" for c in report["sanity"])
