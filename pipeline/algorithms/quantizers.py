"""Weight quantizers: the Binary-Relax paper's per-layer grids (arXiv 2008.13305, its reference code) and int8.

Every quantizer is Q(w) = scale·q with integer codes q (``codes``), and maps 0 to 0, so a pruned weight stays
pruned and a sparse tensor stays at least as sparse once quantized:

- 1 bit   (binary):  q = sign(w), scale = mean|w|;
- 2 bits  (ternary): q = sign(w)·[|w| >= 0.7·mean|w|], scale = Σ|w|·[kept] / numel(w);
- 4 bits:            δ = max|w|/15, |q| = k on [(2k-1)δ, (2k+1)δ) (k = 0…7, 7 from 13δ up), least-squares scale;
- 8 bits  (int8):    per output channel, symmetric, scale_c = max|w_c|/127, as onnxruntime's static int8.
"""
from __future__ import annotations

import torch

BITS = (1, 2, 4, 8)
LEVELS = {1: frozenset((-1, 0, 1)), 2: frozenset((-1, 0, 1)),
          4: frozenset(range(-7, 8)), 8: frozenset(range(-127, 128))}


def _binary_codes(w):
    return w.sign(), w.abs().mean()


def _ternary_codes(w):
    a = w.abs()
    kept = (a >= 0.7 * a.mean()).to(w.dtype)
    # the reference code averages over ALL entries, not over the kept ones as TWN (Li et al. 2016) does
    return kept * w.sign(), (a * kept).sum() / w.numel()


def _fourbit_codes(w):
    a = w.abs()
    delta = a.max() / 15
    # count the odd multiples of δ reached instead of dividing by δ: the edges are then exactly the products
    # (2k-1)·δ. The reference's own edges are (2k-1)δ < |w| <= (2k+1)δ; they differ only at exact ties.
    level = sum((a >= (2 * k - 1) * delta).to(w.dtype) for k in range(1, 8))
    # Σq² > 0 always: the largest |w| is on level 7 (all of them for an all-zero tensor, whose Σ|w|q is 0)
    return level * w.sign(), (a * level).sum() / (level * level).sum()


def _int8_codes(w):
    flat = w.reshape(w.shape[0], -1)
    # onnxruntime computes the scale in float64 and stores it as float32; a zero channel gets scale 1
    absmax = flat.abs().amax(dim=1).double()
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax)).float()
    # onnxruntime's QuantizeLinear: float32 division, round half to even (torch.round), saturate
    q = torch.round(flat.float() / scale[:, None]).clamp(-127, 127)
    return q.reshape(w.shape), scale


_CODES = {1: _binary_codes, 2: _ternary_codes, 4: _fourbit_codes, 8: _int8_codes}


def codes(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): int8 codes in ``LEVELS[bits]`` and the scale (a 0-d tensor; [C] for 8 bits, per dim 0) with
    ``quantize(w, bits) == scale·q`` exactly."""
    if bits not in _CODES:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    q, scale = _CODES[bits](w.detach())
    return q.to(torch.int8), scale


MAX_CODE = {1: 1, 2: 1, 4: 7, 8: 127}


def codes_on_grid(w: torch.Tensor, bits: int, rtol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q, scale) of a tensor that already lies on a ``bits`` grid (scale·q == w within float rounding), read back
    rather than re-quantized -- which would not be a no-op: §5's ternary scale averages over the zeros too, so
    ternary(ternary(w)) shrinks by the kept fraction. None when ``w`` is not on such a grid."""
    w = w.detach()
    if bits == 8:
        absmax = w.reshape(w.shape[0], -1).abs().amax(1)
        scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
        s = scale.view([-1] + [1] * (w.dim() - 1))
    else:
        m = w.abs().max()
        scale = m / MAX_CODE[bits] if m > 0 else torch.ones((), dtype=w.dtype)
        s = scale
    q = torch.round(w / s)
    if (q.abs() > MAX_CODE[bits]).any() or (q * s - w).abs().max() > rtol * max(float(w.abs().max()), 1e-30):
        return None
    return q.to(torch.int8), scale


def quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Q(w) = scale·q, in w's dtype."""
    q, scale = codes(w, bits)
    if scale.dim():
        scale = scale.view([-1] + [1] * (w.dim() - 1))
    return (scale * q.to(scale.dtype)).to(w.dtype)


def binary(w: torch.Tensor) -> torch.Tensor:
    return quantize(w, 1)


def ternary(w: torch.Tensor) -> torch.Tensor:
    return quantize(w, 2)


def fourbit(w: torch.Tensor) -> torch.Tensor:
    return quantize(w, 4)


def int8_per_channel(w: torch.Tensor) -> torch.Tensor:
    return quantize(w, 8)


def grid_sparsity(w: torch.Tensor) -> float:
    """Fraction of exact zeros: ternary and 4-bit grids prune by themselves (the paper's observation)."""
    return float((w == 0).sum()) / max(w.numel(), 1)
