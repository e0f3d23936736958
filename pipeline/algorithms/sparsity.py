"""Sparsity as the paper counts it, beside exact counts. Denominators are conv weights / conv input channels
of all members (BN, biases and the classifier are never counted, in either number)."""
from __future__ import annotations

import torch
import torch.nn as nn

PAPER_ZERO_TOL = 1e-15  # the paper counts a group as zero when its l2 norm is below this


def conv_input_groups(model: nn.Module):
    """(name, weight) of every Conv2d; the groups of a weight [C_out, C_in, k, k] are its C_in slices W[:, i]. A
    depthwise conv's weight [C, 1, k, k] is given as [1, C, k, k]: its groups are its C filters, one per channel
    (as surgery counts them)."""
    from .groups import is_depthwise

    return [(n, m.weight.transpose(0, 1) if is_depthwise(m) else m.weight) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d)]


def group_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)


def channel_sparsity(model: nn.Module, tol: float = PAPER_ZERO_TOL) -> tuple[int, int]:
    """(zero groups, total groups) over the input channels of all convs of all members (675 per ResNet20)."""
    zero = total = 0
    for _, w in conv_input_groups(model):
        norms = group_norms(w)
        zero += int((norms < tol).sum())
        total += norms.numel()
    return zero, total


def channel_weight_sparsity(model: nn.Module, tol: float = PAPER_ZERO_TOL) -> tuple[int, int]:
    """(weights in zero input channels, conv weights): the reference's ``channel_plot.py`` "weight sparsity",
    Σ zero groups × C_out·k·k over all convs (10.917 % for its ResNet20 dump with 171/675 zero channels)."""
    zero = total = 0
    for _, w in conv_input_groups(model):
        zero += int((group_norms(w) < tol).sum()) * (w.numel() // w.shape[1])
        total += w.numel()
    return zero, total


def weight_sparsity(model: nn.Module) -> tuple[int, int]:
    """(exactly zero conv weights, conv weights): the paper's "percentage of zero weights" (Tables 1 and 4)."""
    zero = total = 0
    for _, w in conv_input_groups(model):
        zero += int((w.detach() == 0).sum())
        total += w.numel()
    return zero, total


def sparsity_metrics(model: nn.Module, tol: float = PAPER_ZERO_TOL) -> dict:
    zc, tc = channel_sparsity(model, tol)
    zi, tw = channel_weight_sparsity(model, tol)
    zw, _ = weight_sparsity(model)
    return {"zero_channels": zc, "total_channels": tc, "channel_sparsity": 100.0 * zc / tc,
            "channel_weight_sparsity": 100.0 * zi / tw, "weight_sparsity": 100.0 * zw / tw, "conv_weights": tw}
