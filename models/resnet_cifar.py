"""torchvision's ResNet-18 for 32x32 images: its ImageNet stem (7x7 stride-2 conv + 3x3 stride-2 max-pool) would
leave a 32x32 input at 8x8 before the first stage, so the stem becomes a 3x3 stride-1 conv and the max-pool goes --
the usual CIFAR adaptation. Everything else is torchvision's (post-activation BasicBlocks, 1x1 projection
``downsample``), so module names under ``members.<i>.net.`` are torchvision's. Inputs are [0, 1] images; the mean/std
normalisation is the model's first module (``members.<i>.normalize``). No noise sites."""
from __future__ import annotations

import torch.nn as nn

from .preact_resnet import make_normalize, noiseless_ensemble
from .registry import register_model


class Normalized(nn.Module):
    """``net(normalize(x))``: a network that takes [0, 1] images."""

    def __init__(self, net: nn.Module, normalize: nn.Module):
        super().__init__()
        self.normalize = normalize
        self.net = net

    def forward(self, x):
        return self.net(self.normalize(x))


def resnet18_member(num_classes: int = 10, normalize: bool = True, in_channels: int = 3) -> nn.Module:
    from torchvision.models import resnet18

    net = resnet18(num_classes=num_classes)   # random init, no weights downloaded
    net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")   # as torchvision inits convs
    net.maxpool = nn.Identity()
    return Normalized(net, make_normalize(normalize, in_channels))


@register_model(family="resnet", noise_sites=False, paper=False, depth=18, params_per_member=11_173_962)
def resnet18_cifar(ensemble: int = 1, noise_coef: float = 0.0, num_classes: int = 10, normalize: bool = True,
                   in_channels: int = 3):
    """torchvision resnet18 with a 3x3 stride-1 stem and no max-pool."""
    def build():
        return resnet18_member(num_classes, normalize, in_channels)

    return noiseless_ensemble("resnet18_cifar", build, ensemble, noise_coef)
