"""The prune stage's methods: name -> sparsifier class and its settings (the ``[prune.<name>]`` section).

A sparsifier is shaped like Torch-Pruning's regularizers: built on plain tensors, called as ``before_batch()``,
``regularize()`` after ``backward()``, ``pull(lr)`` after ``optimizer.step()``, ``end_epoch(last)``, with a
checkpointable ``state_dict``; ``describe()`` says in one line what it does. Adding one: the class and a frozen
settings dataclass with a ``check()`` in one module, and one ``SPARSIFIERS.register(...)`` (docs/architecture.md).

Meta of an entry:
- ``groups``: what the class is built on -- ``"families"`` (``ChannelFamily`` list: the paper's conv input-channel
  groups, or coupled removable channels with ``prune.groups = "coupled"``) or ``"kernels"`` (every conv weight);
- ``coupled``: accepts coupled groups, aligned widths and group costs (``align``, ``min_keep``, ``scales``);
- ``grouped``: with ``model.ensemble_impl = "grouped"`` it runs on the grouped-convolution ensemble, its groups
  kept per member (paper groups and kernels only); otherwise the prune stage trains the member list;
- ``before_final``: the report shows the sparsity before the final projection (what the reference code printed).

``prune.method = "none"`` is not a sparsifier: the train checkpoint passes through (a dense baseline row).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..core.checks import non_negative, one_of, positive, require
from ..core.registry import Registry

SPARSIFIERS = Registry("sparsifier")
NONE = "none"


@dataclass(frozen=True)
class RGSMSettings:
    """RGSM (pipeline/algorithms/rgsm.py): group-l0 threshold sqrt(2*lambda1/beta), group lasso lambda2."""
    beta: float = 1.0
    lambda1: float = 0.05       # group l0 weight: threshold sqrt(2*lambda1/beta)
    lambda2: float = 1e-5       # group lasso weight
    prox: str = "hard"          # "hard": group l0 (paper); "soft": group lasso prox, threshold lambda1/beta

    def check(self) -> None:
        positive(self, "beta")
        non_negative(self, "lambda1", "lambda2")
        one_of(self, "prox", ("hard", "soft"))

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RVSMSettings:
    """RVSM (pipeline/algorithms/rvsm.py): the elementwise prox of lam*penalty, relaxed by beta."""
    beta: float = 1.0
    lam: float = 1e-6           # the penalty's weight (the paper's lambda): l0 threshold sqrt(2*lam/beta)
    penalty: str = "l0"         # "l0" (paper), "l1" (soft threshold lam/beta), "tl1" (transformed l1)
    tl1_a: float = 1.0          # the transformed-l1 parameter a

    def check(self) -> None:
        positive(self, "beta", "tl1_a")
        non_negative(self, "lam")
        one_of(self, "penalty", ("l0", "l1", "tl1"))

    def kwargs(self) -> dict:
        return {"beta": self.beta, "lam": self.lam, "penalty": self.penalty, "a": self.tl1_a}


@dataclass(frozen=True)
class ADMMSettings:
    """Projection ADMM (pipeline/algorithms/admm.py): keep each layer's top (100 - percentile) %."""
    sparsity: str = "elem"      # of weights ("elem") or of input channels ("channel")
    percentile: float = 80.0
    rho: float = 1e-2
    # > 0: the projection is onto {sparse} ∩ {the `bits` quantization grid} (ADMM-NN's joint prune + quantize,
    # pipeline/algorithms/quantizers.py: 1 binary, 2 ternary, 4 4-bit, 8 int8 per channel); 0 = sparsity only
    bits: int = 0

    def check(self) -> None:
        one_of(self, "sparsity", ("elem", "channel"))
        require(0 <= self.percentile < 100, "percentile", "a percentile in [0, 100)")
        positive(self, "rho")
        require(self.bits in (0, 1, 2, 4, 8), "bits", "0 (no grid), 1, 2, 4 or 8")

    def kwargs(self) -> dict:
        return {**dataclasses.asdict(self), "bits": self.bits or None}


SPARSIFIERS.register("rgsm", "pipeline.algorithms.rgsm:RGSM", settings=RGSMSettings, groups="families",
                     coupled=True, grouped=True)
SPARSIFIERS.register("rvsm", "pipeline.algorithms.rvsm:RVSM", settings=RVSMSettings, groups="kernels", grouped=True)
SPARSIFIERS.register("admm", "pipeline.algorithms.admm:ADMM", settings=ADMMSettings, groups="kernels",
                     before_final=True)


def method_names() -> tuple[str, ...]:
    """What ``prune.method`` accepts: every registered sparsifier, then "none"."""
    return (*SPARSIFIERS.names(), NONE)
