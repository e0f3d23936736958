"""Pre-activation ResNet for CIFAR with EnResNet noise injection and logit-averaging ensembles.

Inputs are images in [0, 1]; normalisation happens inside the model so exported graphs take raw pixels.
``normalize=False`` feeds the [0, 1] pixels to the stem unchanged, as the paper's reference code does.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ensemble import Ensemble
from .registry import register_model

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    def __init__(self, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def make_normalize(normalize: bool, in_channels: int = 3) -> nn.Module:
    """The model's input normalisation: CIFAR-10's mean/std for 3-channel images, 0.5/0.25 per channel for any other
    channel count (a grey or multispectral input has no CIFAR statistics); ``nn.Identity`` when off."""
    if not normalize:
        return nn.Identity()
    if in_channels == 3:
        return Normalize()
    return Normalize((0.5,) * in_channels, (0.25,) * in_channels)


class ResidualNoise(nn.Module):
    """``out + coef * std(out) * N(0, I)``: EnResNet's noise, on in train *and* eval mode.

    ``std`` is taken over the whole tensor, as in the EnResNet reference code -- so one image's noise depends on
    the other images of its batch. ``per_sample = True`` takes it over each image's own (C, H, W) instead (a
    deployment variant: identical at batch 1, batch-independent otherwise). ``enabled`` and ``per_sample`` are
    plain attributes (not buffers) so switching them for attacks or export never touches weights.
    """

    def __init__(self, coef: float):
        super().__init__()
        self.coef = float(coef)
        self.enabled = True
        self.per_sample = False

    def forward(self, out):
        if self.coef == 0.0 or not self.enabled:
            return out
        if self.per_sample:
            std = out.flatten(1).std(dim=1).view(-1, *([1] * (out.dim() - 1)))
        else:
            std = out.std()
        return out + self.coef * std * torch.randn_like(out)

    def extra_repr(self):
        return f"coef={self.coef}"


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, noise_coef: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        # 1x1 projection applied to the pre-activated input, as in He et al. (2016b) and EnResNet.
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)
        self.noise = ResidualNoise(noise_coef)

    @property
    def has_branch(self) -> bool:
        """False once surgery removed the residual branch (conv1, bn2, conv2: a block-internal family pruned to
        width 0); the block is then its shortcut, noise included."""
        return self.conv1 is not None

    def remove_branch(self) -> None:
        """Drop conv1, bn2 and conv2 (and bn1 when the shortcut is the identity: nothing else reads it)."""
        self.conv1 = self.bn2 = self.conv2 = None
        if self.shortcut is None:
            self.bn1 = None

    def forward(self, x):
        if self.conv1 is None:
            return self.noise(self.shortcut(F.relu(self.bn1(x))) if self.shortcut is not None else x)
        pre = F.relu(self.bn1(x))
        shortcut = self.shortcut(pre) if self.shortcut is not None else x
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return self.noise(out + shortcut)


class PreActResNet(nn.Module):
    def __init__(self, num_blocks, widths=(16, 32, 64), num_classes: int = 10, noise_coef: float = 0.1,
                 normalize: bool = True, in_channels: int = 3):
        super().__init__()
        self.normalize = make_normalize(normalize, in_channels)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        in_planes = widths[0]
        stages = []
        for i, (n, width) in enumerate(zip(num_blocks, widths)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(PreActBlock(in_planes, width, stride, noise_coef))
                in_planes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        out = self.conv1(self.normalize(x))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def noiseless_ensemble(arch: str, build, ensemble: int, noise_coef: float) -> Ensemble:
    """``Ensemble`` of ``ensemble`` members ``build()`` of an architecture without noise sites (``noise_coef`` must be
    0: EnResNet's noise is defined after the residual sums of the pre-activation ResNets only)."""
    if ensemble < 1:
        raise ValueError(f"ensemble must be >= 1, got {ensemble}")
    if noise_coef != 0:
        raise ValueError(f"{arch} has no noise sites: noise_coef must be 0, got {noise_coef:g}")
    return Ensemble([build() for _ in range(ensemble)])


def set_noise(model: nn.Module, enabled: bool) -> None:
    for m in model.modules():
        if isinstance(m, ResidualNoise):
            m.enabled = enabled


class noise_disabled:
    """Context manager: run ``model`` deterministically (for parity checks, export, tracing)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.saved = []

    def __enter__(self):
        self.saved = [(m, m.enabled) for m in self.model.modules() if isinstance(m, ResidualNoise)]
        set_noise(self.model, False)
        return self.model

    def __exit__(self, *exc):
        for m, enabled in self.saved:
            m.enabled = enabled
        return False


NOISE_MODES = ("off", "batch", "per_sample")


class noise_mode:
    """Context manager: run ``model`` with its test-time noise ``off``, as trained (``batch``: std over the whole
    tensor) or ``per_sample`` (std per image). Restores every noise module's settings on exit."""

    def __init__(self, model: nn.Module, mode: str):
        if mode not in NOISE_MODES:
            raise ValueError(f"noise mode must be one of {NOISE_MODES}, got {mode!r}")
        self.model, self.mode, self.saved = model, mode, []

    def __enter__(self):
        mods = [m for m in self.model.modules() if isinstance(m, ResidualNoise)]
        self.saved = [(m, m.enabled, m.per_sample) for m in mods]
        for m in mods:
            m.enabled, m.per_sample = self.mode != "off", self.mode == "per_sample"
        return self.model

    def __exit__(self, *exc):
        for m, enabled, per_sample in self.saved:
            m.enabled, m.per_sample = enabled, per_sample
        return False


def _build(num_blocks, widths, ensemble: int, noise_coef: float, num_classes: int, normalize: bool,
           in_channels: int = 3):
    if ensemble < 1:
        raise ValueError(f"ensemble must be >= 1, got {ensemble}")
    members = [PreActResNet(num_blocks, widths, num_classes, noise_coef, normalize, in_channels)
               for _ in range(ensemble)]
    return Ensemble(members)


@register_model(params_per_member=272_282, depth=20, paper=True, family="preact_resnet", noise_sites=True)
def preact_resnet20(ensemble: int = 1, noise_coef: float = 0.1, num_classes: int = 10, normalize: bool = True,
                    in_channels: int = 3):
    return _build((3, 3, 3), (16, 32, 64), ensemble, noise_coef, num_classes, normalize, in_channels)


@register_model(depth=38, paper=True, family="preact_resnet", noise_sites=True)
def preact_resnet38(ensemble: int = 1, noise_coef: float = 0.1, num_classes: int = 10, normalize: bool = True,
                    in_channels: int = 3):
    return _build((6, 6, 6), (16, 32, 64), ensemble, noise_coef, num_classes, normalize, in_channels)


@register_model(depth=56, paper=True, family="preact_resnet", noise_sites=True)
def preact_resnet56(ensemble: int = 1, noise_coef: float = 0.1, num_classes: int = 10, normalize: bool = True,
                    in_channels: int = 3):
    return _build((9, 9, 9), (16, 32, 64), ensemble, noise_coef, num_classes, normalize, in_channels)


@register_model(depth=8, paper=False, family="preact_resnet", noise_sites=True)
def test_resnet(ensemble: int = 1, noise_coef: float = 0.1, num_classes: int = 10, normalize: bool = True,
                in_channels: int = 3):
    """Tiny (one block per stage, narrow) model with the same structure, for fast tests."""
    return _build((1, 1, 1), (4, 8, 16), ensemble, noise_coef, num_classes, normalize, in_channels)
