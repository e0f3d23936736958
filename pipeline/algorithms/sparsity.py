"""Sparsity as the paper counts it."""
from __future__ import annotations

import torch
import torch.nn as nn

PAPER_ZERO_TOL = 1e-15  # the paper counts a group as zero when its l2 norm is below this


def conv_input_groups(model: nn.Module):
    """(name, weight) of every Conv2d; the groups of a weight [C_out, C_in, k, k] are its C_in slices W[:, i]."""
    return [(n, m.weight) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


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


def weight_sparsity(model: nn.Module) -> tuple[int, int]:
    """(zero weights, total weights) over conv and linear weight tensors (BN and biases excluded)."""
    zero = total = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            zero += int((m.weight.detach() == 0).sum())
            total += m.weight.numel()
    return zero, total
