"""Projection ADMM (Zhang et al., 2018), the paper's baseline, as its reference code ran it -- minus its bugs.

For the constraint "w in S" (S: at most (100 - p) % of each layer's weights, or of its input channels,
nonzero), with the scaled dual u and the auxiliary z:

    epoch start:   z = Proj(w), u = 0            (the reference resets the dual every epoch; kept)
    before batch:  z <- Proj(w + u);  u <- u + w - z
    after step:    w <- w - lr·rho·(w - z + u)   (``pull``, after the optimizer step like RGSM/RVSM here;
                                                  the reference applies it just before the step)
    last epoch:    w <- Proj(w)                  (``end_epoch(last=True)``)

Fixed against the reference code (``rvsm-rgsm-admm`` HEAD ``main.py`` / ``main_admm.py``):

1. the elementwise percentile is taken over |w|, not over signed w (which made the threshold near 0 or
   negative, so almost nothing was projected);
2. the w-update is applied once per layer (HEAD nests it in a second loop over layers: len(weights) times);
3. a final hard projection, so the returned weights really are in S. The reference stops with the dense w,
   which is why Table 4's ADMM has 10.92 % sparsity (elem) and 4.44 % channel sparsity: zeros below 1e-15
   are rare in a w that is only pulled toward z. The prune stage records the sparsity before the final
   projection too, so that number stays visible.

With ``bits`` (1, 2, 4, 8), S becomes "sparse and on the per-layer quantization grid" of ``quantizers.py``:
Proj(w) = quantize(sparse_projection(w), bits). Every grid maps 0 to 0, so the zeros survive and the final
projection leaves weights both on the grid and at least as sparse as the target. This composition is not the
exact Euclidean projection onto the intersection (the grid's scale is fitted after pruning), only a point
of it near w.
"""
from __future__ import annotations

import torch

from .quantizers import BITS, quantize

SPARSITIES = ("elem", "channel")


def _quantile(values: torch.Tensor, percentile: float) -> torch.Tensor:
    """numpy.percentile's default (linear interpolation), as the reference computed it."""
    return torch.quantile(values.detach().double().flatten(), percentile / 100.0).to(values.dtype)


def input_group_norms(w: torch.Tensor) -> torch.Tensor:
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)


def elem_projection(w: torch.Tensor, percentile: float) -> torch.Tensor:
    """Zero the weights whose |w| is below the p-th percentile of this tensor's |w|."""
    return w * (w.abs() >= _quantile(w.abs(), percentile))


def channel_projection(w: torch.Tensor, percentile: float) -> torch.Tensor:
    """Zero the input-channel groups W[:, i] whose l2 norm is at or below the p-th percentile of the layer's."""
    norms = input_group_norms(w)
    keep = (norms > _quantile(norms, percentile)).to(w.dtype)
    return w * keep.view([1, -1] + [1] * (w.dim() - 2))


class ADMM:
    def __init__(self, weights, *, rho: float, percentile: float, sparsity: str = "elem", bits: int | None = None):
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        if not 0 <= percentile < 100:
            raise ValueError(f"percentile must be in [0, 100), got {percentile}")
        if sparsity not in SPARSITIES:
            raise ValueError(f"sparsity must be one of {', '.join(SPARSITIES)}, got {sparsity!r}")
        if bits is not None and bits not in BITS:
            raise ValueError(f"bits must be None or one of {BITS}, got {bits!r}")
        self.weights = list(weights)
        self.rho, self.percentile, self.sparsity, self.bits = float(rho), float(percentile), sparsity, bits
        self.projections = 0
        self.z: list[torch.Tensor] = []
        self.u: list[torch.Tensor] = []
        self.start_epoch()

    def describe(self) -> str:
        return (f"ADMM ({self.sparsity}, {len(self.weights)} conv kernels) rho {self.rho}: keep each layer's top "
                f"{100 - self.percentile:g} % ({self.percentile:g}th percentile)"
                + ("" if self.bits is None else f" on its {self.bits}-bit grid") + ", final projection at the end")

    def proj(self, w: torch.Tensor) -> torch.Tensor:
        if self.sparsity == "elem":
            w = elem_projection(w, self.percentile)
        else:
            w = channel_projection(w, self.percentile)
        return w if self.bits is None else quantize(w, self.bits)

    @torch.no_grad()
    def start_epoch(self) -> None:
        self.z = [self.proj(w.detach()).clone() for w in self.weights]
        self.u = [torch.zeros_like(w) for w in self.weights]

    @torch.no_grad()
    def before_batch(self) -> None:
        for i, w in enumerate(self.weights):
            self.z[i] = self.proj(w + self.u[i])
            self.u[i] += w - self.z[i]

    def regularize(self) -> None:
        pass

    @torch.no_grad()
    def pull(self, lr: float) -> None:
        for w, z, u in zip(self.weights, self.z, self.u):
            w.sub_(w - z + u, alpha=lr * self.rho)

    @torch.no_grad()
    def project(self) -> None:
        """w <- Proj(w): the final projection."""
        for w in self.weights:
            w.copy_(self.proj(w))
        self.projections += 1

    def end_epoch(self, last: bool = False) -> None:
        if last:
            self.project()
        else:
            self.start_epoch()

    def state_dict(self) -> dict:
        # no "bits" key without bits: the state of a plain ADMM stays what it always was
        return {"rho": self.rho, "percentile": self.percentile, "sparsity": self.sparsity,
                "projections": self.projections, "z": [z.cpu() for z in self.z], "u": [u.cpu() for u in self.u],
                **({} if self.bits is None else {"bits": self.bits})}

    def load_state_dict(self, state: dict) -> None:
        self.rho, self.percentile, self.sparsity = state["rho"], state["percentile"], state["sparsity"]
        self.bits = state.get("bits")
        self.projections = state["projections"]
        self.z = [z.to(w.device) for z, w in zip(state["z"], self.weights)]
        self.u = [u.to(w.device) for u, w in zip(state["u"], self.weights)]
