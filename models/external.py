"""Models from outside the registry: ``arch = "package.module:function"``.

The function is imported with importlib and called with the user's keyword arguments (plus ``num_classes`` when its
signature names a ``num_classes`` parameter and the user did not give one -- ``builder_kwargs``). It must return an
``nn.Module`` that takes [0, 1] NCHW images (its own normalisation inside, if any) and returns logits
``[batch, num_classes]``. ``ensemble``, ``noise_coef`` and ``normalize`` are the registry builders' arguments and are
never passed: an external model has no noise sites and normalises its input itself.

``create_external`` wraps the module in ``Ensemble([module])``, so its parameters are named ``members.0.<the user's
names>`` like every registry model's, and surgery, descriptions, export and the reports see one layout.

A pruned external model is described like any other (models/shapes.py): the builder path, its kwargs and the
widths that differ from the dense build -- plain JSON, so a saved model loads with ``torch.load(weights_only=True)``
and no pickled module (pickled code would run on load, and would not survive the user editing their module).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch
import torch.nn as nn


def is_external(arch: str) -> bool:
    """``package.module:function`` (the user's builder), not a registry name."""
    return ":" in arch


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _load(arch: str) -> tuple[Callable | None, str | None]:
    """(the builder, None) or (None, what is wrong) -- without calling it."""
    module_name, _, function = arch.partition(":")
    if not module_name or not all(p.isidentifier() for p in module_name.split(".")) or not function.isidentifier():
        return None, f'expected "package.module:function", got {arch!r}'
    try:
        module = importlib.import_module(module_name)
    except Exception as e:   # ImportError, or whatever the user's module raises while it is imported
        return None, f"cannot import module {module_name} ({_first_line(e)})"
    if not hasattr(module, function):
        return None, f"module {module_name} ({getattr(module, '__file__', None) or 'no file'}) has no {function!r}"
    fn = getattr(module, function)
    if not callable(fn):
        return None, f"{arch} is a {type(fn).__name__}, not a function"
    return fn, None


def external_problem(arch: str) -> str | None:
    """What is wrong with ``arch`` short of calling it (None when it names a callable): for the config check."""
    return _load(arch)[1]


def load_builder(arch: str) -> Callable[..., nn.Module]:
    """The function ``arch`` names; ValueError saying what is wrong otherwise."""
    fn, problem = _load(arch)
    if problem is not None:
        raise ValueError(problem)
    return fn


def takes_num_classes(fn: Callable) -> bool:
    """Whether ``fn``'s signature names a ``num_classes`` parameter (``**kwargs`` alone does not count)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    p = params.get("num_classes")
    return p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)


def builder_kwargs(arch: str, kwargs: dict, num_classes: int | None) -> dict:
    """The keyword arguments the pipeline calls (and records for) the builder with: the user's ``kwargs``, plus
    ``num_classes`` when the function takes it and ``kwargs`` does not set it."""
    out = dict(kwargs)
    if num_classes is not None and "num_classes" not in out and takes_num_classes(load_builder(arch)):
        out["num_classes"] = int(num_classes)
    return out


def _call(arch: str, kwargs: dict) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"{arch}({args})"


def create_external(arch: str, **kwargs) -> nn.Module:
    """``Ensemble([function(**kwargs)])``; ValueError when the function cannot be loaded, TypeError when it does not
    return an ``nn.Module``."""
    from .ensemble import Ensemble

    fn = load_builder(arch)
    module = fn(**kwargs)
    if not isinstance(module, nn.Module):
        raise TypeError(f"{_call(arch, kwargs)} returned a {type(module).__name__}, not a torch.nn.Module")
    return Ensemble([module])


def builder_problem(arch: str, kwargs: dict, num_classes: int, input_shape: tuple[int, int, int]) -> str | None:
    """One line saying what is wrong with the builder ``arch`` for ``num_classes`` classes of ``input_shape``
    (C, H, W) images, or None: it imports, is callable, accepts the kwargs, returns an ``nn.Module``, and maps a
    zeros batch of 2 (eval mode, no grad) to logits [2, num_classes]."""
    fn, problem = _load(arch)
    if problem is not None:
        return problem
    call = dict(kwargs)
    if "num_classes" not in call and takes_num_classes(fn):
        call["num_classes"] = int(num_classes)
    try:
        module = fn(**call)
    except TypeError as e:
        return f"{_call(arch, call)} raised {_first_line(e)}"
    except Exception as e:
        return f"{_call(arch, call)} raised {_first_line(e)}"
    if not isinstance(module, nn.Module):
        return f"{_call(arch, call)} returned a {type(module).__name__}, not a torch.nn.Module"
    shape = [2, *map(int, input_shape)]
    try:
        like = next(module.parameters(), None)
        x = torch.zeros(shape, dtype=like.dtype if like is not None and like.is_floating_point() else torch.float32,
                        device=like.device if like is not None else "cpu")
        with torch.no_grad():
            out = module.eval()(x)
    except Exception as e:
        return f"the model of {arch} fails on a zeros batch {shape}: {_first_line(e)}"
    if not isinstance(out, torch.Tensor):
        return (f"the model of {arch} returns a {type(out).__name__} on a zeros batch {shape}; expected a logits "
                f"tensor [2, {num_classes}]")
    if list(out.shape) != [2, int(num_classes)]:
        return (f"the model of {arch} maps a zeros batch {shape} to {list(out.shape)}; expected [2, {num_classes}] "
                f"(logits of the {num_classes} classes)")
    return None
