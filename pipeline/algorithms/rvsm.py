"""Relaxed Variable Splitting Method (RVSM) for unstructured pruning (Dinh & Xin; the paper's Algorithm 1).

With u = prox(w) elementwise, one training step is

    optimizer.step()
    w <- w - lr·beta·(w - u)      (``pull``; not through momentum or weight decay, as the reference's HEAD code)

and at every epoch end w <- u (``project``): a permanent hard prune, after which zeros may regrow. The prox
solves u = argmin_v  lam·P(v) + (beta/2)·(v - w)² per weight, with t = lam/beta:

- ``l0``  P = [v ≠ 0]: hard threshold, u = w·1{|w| > sqrt(2·t)} (the paper's choice);
- ``l1``  P = |v|: soft threshold, u = sign(w)·max(|w| - t, 0);
- ``tl1`` P = (a+1)|v|/(a+|v|) (transformed l1, Zhang & Xin 2018): the closed-form TL1 thresholding
  operator, zero below ``tl1_cutoff(t, a)`` and a cosine formula above it. a -> 0 tends to l0, a -> inf to l1.
"""
from __future__ import annotations

import math

import torch

PENALTIES = ("l0", "l1", "tl1")


def hard_threshold(w: torch.Tensor, threshold: float) -> torch.Tensor:
    """w·1{|w| > threshold}."""
    return w * (w.abs() > threshold)


def soft_threshold(w: torch.Tensor, threshold: float) -> torch.Tensor:
    """sign(w)·max(|w| - threshold, 0)."""
    return w.sign() * (w.abs() - threshold).clamp_min(0)


def tl1_cutoff(t: float, a: float) -> float:
    """The magnitude at and below which the TL1 prox (parameter t = lam/beta) returns 0."""
    if t <= a * a / (2 * (a + 1)):
        return t * (a + 1) / a
    return math.sqrt(2 * t * (a + 1)) - a / 2


def tl1_threshold(w: torch.Tensor, t: float, a: float) -> torch.Tensor:
    """argmin_v t·(a+1)|v|/(a+|v|) + (1/2)(v - w)², elementwise (Zhang & Xin 2018, Theorem 3.1)."""
    x = w.abs()
    phi = torch.arccos((1 - 27 * t * a * (a + 1) / (2 * (a + x) ** 3)).clamp(-1.0, 1.0))
    g = (2 / 3) * (a + x) * torch.cos(phi / 3) - 2 * a / 3 + x / 3
    return torch.where(x > tl1_cutoff(t, a), w.sign() * g, torch.zeros_like(w))


def rvsm_prox(w: torch.Tensor, penalty: str, lam: float, beta: float, a: float = 1.0) -> torch.Tensor:
    t = lam / beta
    if penalty == "l0":
        return hard_threshold(w, math.sqrt(2 * t))
    if penalty == "l1":
        return soft_threshold(w, t)
    if penalty == "tl1":
        return tl1_threshold(w, t, a)
    raise ValueError(f"penalty must be one of {', '.join(PENALTIES)}, got {penalty!r}")


class RVSM:
    """RVSM over a list of weight tensors (the paper: every 4-D conv kernel, stem and 1x1 shortcuts included)."""

    def __init__(self, weights, *, beta: float, lam: float, penalty: str = "l0", a: float = 1.0):
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {', '.join(PENALTIES)}, got {penalty!r}")
        if penalty == "tl1" and not a > 0:
            raise ValueError(f"the TL1 parameter a must be > 0, got {a}")
        self.weights = list(weights)
        self.beta, self.lam, self.penalty, self.a = float(beta), float(lam), penalty, float(a)
        self.projections = 0

    @property
    def threshold(self) -> float:
        """Magnitude at and below which u is zero."""
        t = self.lam / self.beta
        if self.penalty == "l0":
            return math.sqrt(2 * t)
        return t if self.penalty == "l1" else tl1_cutoff(t, self.a)

    def prox(self, w: torch.Tensor) -> torch.Tensor:
        return rvsm_prox(w, self.penalty, self.lam, self.beta, self.a)

    def describe(self) -> str:
        return (f"RVSM ({self.penalty}, {len(self.weights)} conv kernels) beta {self.beta}, lambda {self.lam}: "
                f"weights with |w| <= {self.threshold:.4g} are pulled to 0")

    def before_batch(self) -> None:
        pass

    def regularize(self) -> None:
        pass

    @torch.no_grad()
    def pull(self, lr: float) -> None:
        """w <- w - lr·beta·(w - u). Call after ``optimizer.step()``."""
        for w in self.weights:
            w.sub_(w - self.prox(w), alpha=lr * self.beta)

    @torch.no_grad()
    def project(self) -> None:
        """w <- u."""
        for w in self.weights:
            w.copy_(self.prox(w))
        self.projections += 1

    def end_epoch(self, last: bool = False) -> None:
        self.project()

    def state_dict(self) -> dict:
        return {"beta": self.beta, "lam": self.lam, "penalty": self.penalty, "a": self.a,
                "projections": self.projections}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.lam, self.penalty, self.a = state["beta"], state["lam"], state["penalty"], state["a"]
        self.projections = state["projections"]
