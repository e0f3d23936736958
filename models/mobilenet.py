"""MobileNetV2 (Sandler et al., 2018) for 32x32 images: inverted residuals with depthwise 3x3 convs.

The CIFAR adaptation keeps the ImageNet network's stage table but drops two of its five downsamplings: the stem is
a stride-1 3x3 conv and the second stage (24 channels) runs at stride 1, so a 32x32 input reaches the head at 4x4
(the layout of the widely used pytorch-cifar variant). Inputs are [0, 1] images; the mean/std normalisation is the
model's first module, as in ``PreActResNet``. No noise sites: EnResNet's noise is defined for the pre-activation
ResNets only.

Module names (under ``members.<i>.``): ``conv1``/``bn1`` stem, ``layers.<j>`` the inverted residuals (``conv1``/
``bn1`` the 1x1 expansion -- absent for expansion 1 --, ``conv2``/``bn2`` the depthwise 3x3, ``conv3``/``bn3`` the
linear 1x1 projection), ``conv2``/``bn2`` the 1x1 head conv, ``linear`` the classifier.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .preact_resnet import make_normalize, noiseless_ensemble
from .registry import register_model

# (expansion t, output channels c, blocks n, stride of the first block s), Sandler et al. Table 2 with the two
# strides the 32x32 variant removes (the stem's and the 24-channel stage's) set to 1.
CIFAR_CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
             (6, 320, 1, 1))


class InvertedResidual(nn.Module):
    """1x1 expansion (ReLU6) -> depthwise 3x3 at ``stride`` (ReLU6) -> linear 1x1 projection, plus the input when
    the block keeps the shape (stride 1, in == out)."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
        super().__init__()
        hidden = in_planes * expansion
        self.stride = stride
        self.residual = stride == 1 and in_planes == out_planes
        if expansion != 1:
            self.conv1 = nn.Conv2d(in_planes, hidden, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(hidden)
        else:
            self.conv1 = self.bn1 = None
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x):
        out = x if self.conv1 is None else F.relu6(self.bn1(self.conv1(x)))
        out = F.relu6(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + x if self.residual else out


class MobileNetV2(nn.Module):
    def __init__(self, cfg=CIFAR_CFG, stem: int = 32, head: int = 1280, num_classes: int = 10,
                 normalize: bool = True, in_channels: int = 3):
        super().__init__()
        self.normalize = make_normalize(normalize, in_channels)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        blocks, in_planes = [], stem
        for expansion, out_planes, n, stride in cfg:
            for j in range(n):
                blocks.append(InvertedResidual(in_planes, out_planes, expansion, stride if j == 0 else 1))
                in_planes = out_planes
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(in_planes, head, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(head)
        self.linear = nn.Linear(head, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = F.relu6(self.bn1(self.conv1(self.normalize(x))))
        out = self.layers(out)
        out = F.relu6(self.bn2(self.conv2(out)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_model(family="mobilenet_v2", noise_sites=False, paper=False, params_per_member=2_236_682)
def mobilenet_v2_cifar(ensemble: int = 1, noise_coef: float = 0.0, num_classes: int = 10, normalize: bool = True,
                       in_channels: int = 3):
    """MobileNetV2 (width 1.0, 1280-wide head) for 32x32 images: stride-1 stem, stride 1 in the 24-channel stage."""

    def build():
        return MobileNetV2(CIFAR_CFG, 32, 1280, num_classes, normalize, in_channels)

    return noiseless_ensemble("mobilenet_v2_cifar", build, ensemble, noise_coef)


@register_model(family="mobilenet_v2", noise_sites=False, paper=False)
def test_mobilenet(ensemble: int = 1, noise_coef: float = 0.0, num_classes: int = 10, normalize: bool = True,
                   in_channels: int = 3):
    """Tiny MobileNetV2 for fast tests: stem 8, three inverted residuals (expansion 1 without a residual, a
    stride-2 one, a residual one), head 32."""
    cfg = ((1, 4, 1, 1), (4, 8, 2, 2))

    def build():
        return MobileNetV2(cfg, 8, 32, num_classes, normalize, in_channels)

    return noiseless_ensemble("test_mobilenet", build, ensemble, noise_coef)
