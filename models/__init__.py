from .preact_resnet import (NOISE_MODES, Ensemble, PreActBlock, PreActResNet, ResidualNoise, noise_disabled, noise_mode,
                            set_noise)
from .registry import create_model, list_models, model_entry, register_model
from .shapes import build_from_description, describe

__all__ = [
    "Ensemble", "PreActBlock", "PreActResNet", "ResidualNoise", "noise_disabled", "set_noise", "NOISE_MODES", "noise_mode",
    "create_model", "list_models", "model_entry", "register_model", "build_from_description", "describe",
]
