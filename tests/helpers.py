"""Builders shared by several test modules."""
import torch
import torch.nn as nn

import models


def randomized_model(arch: str, ensemble: int = 1, seed: int = 0, **kwargs) -> nn.Module:
    """``arch`` (En_``ensemble`` for registry models; kwargs to the builder, EnResNet noise 0.1 unless given) in
    eval mode with BN statistics and affines far from identity, so that a slice that surgery misses or mis-maps
    shows up in the logits."""
    torch.manual_seed(seed)
    if ":" not in arch:
        family = models.model_entry(arch).metadata.get("family")
        kwargs = {"ensemble": ensemble, **({"noise_coef": 0.1} if family == "preact_resnet" else {}), **kwargs}
    model = models.create_model(arch, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model.eval()
