from . import mobilenet, resnet_cifar  # noqa: F401  (importing them registers their builders)
from .external import builder_kwargs, builder_problem, is_external
from .preact_resnet import (NOISE_MODES, Ensemble, PreActBlock, PreActResNet, ResidualNoise, noise_disabled, noise_mode,
                            set_noise)
from .registry import create_model, list_models, model_entry, register_model, supports_latency_budget
from .shapes import build_from_description, describe

__all__ = [
    "Ensemble", "PreActBlock", "PreActResNet", "ResidualNoise", "noise_disabled", "set_noise", "NOISE_MODES", "noise_mode",
    "create_model", "list_models", "model_entry", "register_model", "build_from_description", "describe",
    "builder_kwargs", "builder_problem", "is_external", "supports_latency_budget",
]
