"""Binary-Relax quantization-aware training (Yin et al. 2018, as arXiv 2008.13305's reference code runs it).

BR minimises f(w) + (η/2)·dist(w, Q)² with a growing η. Each batch is attacked, run and differentiated at

    epoch <  relax_epochs:  (η·Q(w) + w) / (1 + η)     η = eta0·eta_growth^epoch
    epoch >= relax_epochs:  Q(w)

(Q: the per-layer grid of ``quantizers.py``) and the gradient is applied to the float weights w
(straight-through): ``before_batch`` swaps the relaxed weights into the parameters, ``regularize`` -- after
backward, before the optimizer step -- swaps the float ones back. ``end_epoch(last=True)`` leaves Q(w) for
good: what ships.
"""
from __future__ import annotations

import contextlib

import torch

from .quantizers import BITS, quantize


class BinaryRelax:
    def __init__(self, weights, *, bits: int, relax_epochs: int, eta0: float = 1.0, eta_growth: float = 1.05):
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
        if relax_epochs < 0:
            raise ValueError(f"relax_epochs must be >= 0, got {relax_epochs}")
        if not eta0 > 0:
            raise ValueError(f"eta0 must be > 0, got {eta0}")
        if not eta_growth >= 1:
            raise ValueError(f"eta_growth must be >= 1, got {eta_growth}")
        self.weights = list(weights)
        self.bits, self.relax_epochs = int(bits), int(relax_epochs)
        self.eta0, self.eta_growth = float(eta0), float(eta_growth)
        self.epoch, self.eta = 0, self.eta0
        self.finished = False   # set by the last end_epoch: the weights are Q(w) from then on
        self.floats: list[torch.Tensor] | None = None   # the float weights while the relaxed ones are in place

    def describe(self) -> str:
        return (f"Binary-Relax ({self.bits}-bit grid, {len(self.weights)} conv kernels): train at "
                f"(eta·Q(w) + w)/(1 + eta), eta {self.eta0:g} x{self.eta_growth:g} per epoch, for "
                f"{self.relax_epochs} epochs, then at Q(w); straight-through to the float weights, Q(w) at the end")

    @property
    def relaxing(self) -> bool:
        return self.epoch < self.relax_epochs

    def relaxed(self, w: torch.Tensor) -> torch.Tensor:
        """The weights this epoch's batches run at."""
        q = quantize(w, self.bits)
        return (self.eta * q + w) / (1 + self.eta) if self.relaxing else q

    @torch.no_grad()
    def before_batch(self) -> None:
        self._restore()   # a batch that never reached regularize() (it raised) must not relax twice
        self.floats = [w.detach().clone() for w in self.weights]
        for w in self.weights:
            # in place: the optimizer, DDP and a captured CUDA graph keep pointing at the same storage
            w.copy_(self.relaxed(w))

    @torch.no_grad()
    def _restore(self) -> None:
        if self.floats is not None:
            for w, f in zip(self.weights, self.floats):
                w.copy_(f)
            self.floats = None

    def regularize(self) -> None:
        self._restore()

    def pull(self, lr: float) -> None:
        pass

    @torch.no_grad()
    def end_epoch(self, last: bool = False) -> None:
        self._restore()
        self.eta *= self.eta_growth
        self.epoch += 1
        if last:
            for w in self.weights:
                w.copy_(quantize(w, self.bits))
            # the weights ARE Q(w) now; quantizing again is not a no-op for §5's ternary (its scale averages
            # over the zeros too, so Q(Q(w)) shrinks by the kept fraction)
            self.finished = True

    @contextlib.contextmanager
    def quantized(self):
        """The parameters at Q(w) inside the block (validation of what ships), the float weights after it."""
        if self.finished:   # already Q(w), for good
            yield self
            return
        saved = [w.detach().clone() for w in self.weights]
        floats = self.floats or saved   # mid-batch, the parameters hold the relaxed weights, not w
        try:
            with torch.no_grad():
                for w, f in zip(self.weights, floats):
                    w.copy_(quantize(f, self.bits))
            yield self
        finally:
            with torch.no_grad():
                for w, f in zip(self.weights, saved):
                    w.copy_(f)

    def state_dict(self) -> dict:
        return {"bits": self.bits, "relax_epochs": self.relax_epochs, "eta0": self.eta0,
                "eta_growth": self.eta_growth, "epoch": self.epoch, "eta": self.eta, "finished": self.finished}

    def load_state_dict(self, state: dict) -> None:
        self._restore()
        self.bits, self.relax_epochs = state["bits"], state["relax_epochs"]
        self.eta0, self.eta_growth = state["eta0"], state["eta_growth"]
        self.epoch, self.eta = state["epoch"], state["eta"]
        self.finished = state.get("finished", False)
