"""Name -> builder + metadata, in the spirit of timm's ``_registry.py``."""
from __future__ import annotations

import functools
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
    """The registry entry of ``name``; for ``package.module:function`` (the user's builder, models/external.py) an
    entry whose builder imports and calls it and wraps the module in ``Ensemble([module])``, with metadata
    ``noise_sites=False, external=True`` (nothing is imported until the builder is called)."""
    from .external import create_external, is_external

    if is_external(name):
        return ModelEntry(name, functools.partial(create_external, name),
                          {"noise_sites": False, "external": True, "family": "external", "paper": False})
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r} (known: {', '.join(list_models())})") from None


def create_model(name: str, **kwargs) -> nn.Module:
    """A registry model built with ``kwargs`` or, for ``name = "package.module:function"``, ``Ensemble([function(
    **kwargs)])``: every keyword goes to the user's function unchanged (the caller adds ``num_classes`` when the
    function takes it: ``models.external.builder_kwargs``)."""
    return model_entry(name).builder(**kwargs)


LATENCY_FAMILIES = ("preact_resnet",)


def supports_latency_budget(arch: str) -> bool:
    """Whether the latency budget (pipeline/algorithms/latency.py: the network cut into a stem, pre-activation
    residual blocks and a head) applies to the architecture ``arch``: the registry's pre-activation ResNets only."""
    return model_entry(arch).metadata.get("family") in LATENCY_FAMILIES
