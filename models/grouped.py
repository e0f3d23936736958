"""The n members of an En_n ensemble as one network: every conv a grouped conv (``groups = n``), every BN over
n·C channels, per-member noise scale and classifier. The same function as the member list -- member i owns
channel block i of every layer -- with n times fewer kernel launches, which is what keeps a GPU busy.

The stem reads the shared input, so it is one ordinary conv with n·C outputs. Each member's noise is scaled by
the std of its own block (exactly what the member list computes); only the random draws differ in order.
``to_grouped`` / ``to_members`` convert models (and so checkpoints) both ways; artifacts are always saved in
the member-list form, so surgery, export and every reader of a saved model are unchanged.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .preact_resnet import Ensemble, PreActResNet, ResidualNoise


class GroupedResidualNoise(ResidualNoise):
    """``out + coef·std_i(out_i)·N(0, I)`` with std_i over member i's channel block of the whole batch."""

    def __init__(self, coef: float, n: int):
        super().__init__(coef)
        self.n = n

    def forward(self, out):
        if self.coef == 0.0 or not self.enabled:
            return out
        b, c = out.shape[:2]
        std = out.reshape(b, self.n, -1).transpose(0, 1).reshape(self.n, -1).std(dim=1)
        scale = std.repeat_interleave(c // self.n).view(1, c, 1, 1)
        return out + self.coef * scale * torch.randn_like(out)


class GroupedBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, planes: int, stride: int, shortcut: bool, noise_coef: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(n * in_planes)
        self.conv1 = nn.Conv2d(n * in_planes, n * planes, 3, stride, 1, bias=False, groups=n)
        self.bn2 = nn.BatchNorm2d(n * planes)
        self.conv2 = nn.Conv2d(n * planes, n * planes, 3, 1, 1, bias=False, groups=n)
        self.shortcut = nn.Conv2d(n * in_planes, n * planes, 1, stride, bias=False, groups=n) if shortcut else None
        self.noise = GroupedResidualNoise(noise_coef, n)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        shortcut = self.shortcut(pre) if self.shortcut is not None else x
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return self.noise(out + shortcut)


class GroupedEnsemble(nn.Module):
    """Built from a dense member-list ``Ensemble`` of ``PreActResNet``s (``to_grouped``)."""

    def __init__(self, template: PreActResNet, n: int, noise_coef: float):
        super().__init__()
        self.n = n
        self.normalize = copy.deepcopy(template.normalize)   # CIFAR's or a generic mean/std, or nn.Identity
        self.conv1 = nn.Conv2d(template.conv1.in_channels, n * template.conv1.out_channels, 3, 1, 1, bias=False)
        for name in ("layer1", "layer2", "layer3"):
            blocks = [GroupedBlock(n, b.conv1.in_channels, b.conv1.out_channels, b.conv1.stride[0],
                                   b.shortcut is not None, noise_coef) for b in getattr(template, name)]
            setattr(self, name, nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(n * template.bn.num_features)
        classes, features = template.linear.weight.shape
        self.linear_weight = nn.Parameter(torch.zeros(n, classes, features))
        self.linear_bias = nn.Parameter(torch.zeros(n, classes))

    def forward(self, x):
        out = self.conv1(self.normalize(x))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
        logits = torch.einsum("bnc,nkc->bnk", out.view(out.shape[0], self.n, -1), self.linear_weight)
        return (logits + self.linear_bias).mean(dim=1)


def _member_key(key: str) -> str:
    return {"linear_weight": "linear.weight", "linear_bias": "linear.bias"}.get(key, key)


def _shared(key: str) -> bool:
    """Entries every member holds an identical copy of (the input normalisation, BN step counters)."""
    return key.startswith("normalize.") or key.endswith("num_batches_tracked")


def to_grouped(model: Ensemble) -> GroupedEnsemble:
    """The grouped network computing ``model``'s function (members must share one architecture, e.g. dense)."""
    members = list(model.members)
    if not all(isinstance(m, PreActResNet) for m in members):
        kinds = sorted({type(m).__name__ for m in members})
        raise ValueError(f"the grouped ensemble is built for pre-activation ResNet members, got {', '.join(kinds)} "
                         '(use model.ensemble_impl = "members")')
    shapes = {tuple((k, tuple(v.shape)) for k, v in m.state_dict().items()) for m in members}
    if len(shapes) != 1:
        raise ValueError("to_grouped needs members of one architecture (a pruned ensemble has per-member widths)")
    n, first = len(members), members[0]
    coef = next((m.coef for m in first.modules() if isinstance(m, ResidualNoise)), 0.0)
    like = next(first.parameters())
    grouped = GroupedEnsemble(first, n, coef).to(device=like.device, dtype=like.dtype)
    states = [m.state_dict() for m in members]
    new = {}
    for key in grouped.state_dict():
        parts = [s[_member_key(key)] for s in states]
        if _shared(key):
            new[key] = parts[0]
        elif key in ("linear_weight", "linear_bias"):
            new[key] = torch.stack(parts)
        else:
            new[key] = torch.cat(parts, dim=0)
    grouped.load_state_dict(new)
    grouped.train(model.training)
    return grouped


@torch.no_grad()
def to_members(grouped: GroupedEnsemble, template: Ensemble) -> Ensemble:
    """Write ``grouped``'s weights into ``template`` (a member-list ensemble of the same architecture)."""
    n = grouped.n
    state = grouped.state_dict()
    for i, member in enumerate(template.members):
        new = {}
        for key in member.state_dict():
            gkey = {"linear.weight": "linear_weight", "linear.bias": "linear_bias"}.get(key, key)
            value = state[gkey]
            new[key] = value if _shared(gkey) else value[i] if gkey.startswith("linear_") else value.chunk(n)[i]
        member.load_state_dict(new)
    template.train(grouped.training)
    return template
