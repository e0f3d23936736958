"""Name -> builder + metadata, in the spirit of timm's ``_registry.py``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    metadata: dict = field(default_factory=dict)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(**metadata):
    def wrap(fn: Callable[..., nn.Module]):
        if fn.__name__ in _REGISTRY:
            raise ValueError(f"model {fn.__name__!r} registered twice")
        _REGISTRY[fn.__name__] = ModelEntry(fn.__name__, fn, dict(metadata))
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r} (known: {', '.join(list_models())})") from None


def create_model(name: str, **kwargs) -> nn.Module:
    return model_entry(name).builder(**kwargs)
