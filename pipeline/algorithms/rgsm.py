"""Relaxed Group-wise Splitting Method (RGSM) for channel pruning.

Each conv weight W [C_out, C_in, k, k] is split into groups W[:, i] (its input channels). With
u = H(w), the group hard threshold at sqrt(2·lambda1/beta), one training step is

    loss + lambda2·Σ_g ||w_g||_2          (group lasso, via ``regularize`` after backward)
    optimizer.step()
    w <- w - lr·beta·(w - u)              (``pull``, after the optimizer step)

and at every epoch end w <- u (``project``). Shaped like Torch-Pruning's regularizers: plain tensors in,
no I/O, and a ``state_dict`` so a run can be checkpointed mid-way.
"""
from __future__ import annotations

import math

import torch


def group_hard_threshold(weight: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zero every input-channel group W[:, i] whose l2 norm is <= ``threshold``; keep the others unchanged."""
    norms = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    keep = (norms > threshold).to(weight.dtype)
    shape = [1, -1] + [1] * (weight.dim() - 2)
    return weight * keep.view(shape)


def group_lasso_grad(weight: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Gradient of Σ_i ||W[:, i]||_2, taking the subgradient 0 at a zero group."""
    norms = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    shape = [1, -1] + [1] * (weight.dim() - 2)
    scale = torch.where(norms > eps, 1.0 / norms.clamp_min(1e-30), torch.zeros_like(norms))
    return weight * scale.view(shape)


class RGSM:
    def __init__(self, weights: list[torch.Tensor], *, beta: float, lambda1: float, lambda2: float):
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.weights = list(weights)
        self.beta = float(beta)
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)
        self.projections = 0

    @property
    def threshold(self) -> float:
        return math.sqrt(2.0 * self.lambda1 / self.beta)

    @torch.no_grad()
    def regularize(self) -> None:
        """Add lambda2·∂Σ||w_g|| to each weight's gradient. Call after ``backward()``, before ``step()``."""
        if self.lambda2 == 0:
            return
        for w in self.weights:
            if w.grad is None:
                w.grad = torch.zeros_like(w)
            w.grad.add_(group_lasso_grad(w), alpha=self.lambda2)

    @torch.no_grad()
    def pull(self, lr: float) -> None:
        """w <- w - lr·beta·(w - u): relax w toward its group-sparse copy. Call after ``optimizer.step()``."""
        for w in self.weights:
            u = group_hard_threshold(w, self.threshold)
            w.sub_(w - u, alpha=lr * self.beta)

    @torch.no_grad()
    def project(self) -> None:
        """w <- u. Call at every epoch end."""
        for w in self.weights:
            w.copy_(group_hard_threshold(w, self.threshold))
        self.projections += 1

    def state_dict(self) -> dict:
        return {"beta": self.beta, "lambda1": self.lambda1, "lambda2": self.lambda2,
                "projections": self.projections}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.lambda1, self.lambda2 = state["beta"], state["lambda1"], state["lambda2"]
        self.projections = state["projections"]
