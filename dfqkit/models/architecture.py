"""How to build a model object again: a registered factory and its arguments.

A run directory must be rebuildable from its ``config.gin`` alone, also when the teacher was an
``nn.Module`` handed to :func:`dfqkit.quantize`. :func:`find_architecture` finds a registered
factory that builds the same architecture, in this order:

1. a model built by a registered dfqkit factory remembers how (``registry.BUILT_BY``);
2. a timm model: ``models.timm_model(name=<pretrained_cfg architecture>)``;
3. a torchvision classifier: ``models.torchvision_model(name=...)``, the builder whose model has
   the same class and the same parameter names and shapes;
4. a class importable from its module whose no-argument constructor gives the same parameter
   names and shapes: ``models.callable_model(target='pkg.module:Class')``;
5. ``architecture='pkg.module:function'`` given by the user (a callable without arguments that
   returns the float model), which takes precedence over all of the above.

The weights travel separately (a safetensors file in the run directory). The caller checks that
the rebuilt model computes exactly what the given one does.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torchvision
from torch import nn

from dfqkit.models.weights import load_weights
from dfqkit.registry import BUILT_BY, register


@dataclass(frozen=True)
class Architecture:
    """A registered model factory (gin: ``@models.<factory>()``) and its arguments, without
    ``weights``."""

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def bindings(self, scope: str = "") -> list[str]:
        """The gin bindings of the arguments, ``models.<factory>.<arg> = <value>``."""
        prefix = f"{scope}/" if scope else ""
        return [f"{prefix}models.{self.factory}.{k} = {v!r}" for k, v in self.kwargs.items()]


def _signature(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _literal(value: Any) -> bool:
    """Whether ``value`` is written in gin as its ``repr`` (numbers, strings, containers)."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_literal(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _literal(v) for k, v in value.items())
    return False


def _registered(model: nn.Module) -> Architecture | None:
    built_by = getattr(model, BUILT_BY, None)
    if built_by is None:
        return None
    factory, kwargs = built_by
    kwargs = {k: v for k, v in kwargs.items() if k != "weights"}
    return Architecture(factory, kwargs) if _literal(kwargs) else None


def _timm(model: nn.Module) -> Architecture | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not type(model).__module__.startswith("timm.") or not name or not timm.is_model(name):
        return None
    return Architecture("timm_model", {"name": name, "num_classes": model.num_classes})


def _num_classes(model: nn.Module) -> int | None:
    last = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    if not last:
        return None
    return last[-1].out_features if isinstance(last[-1], nn.Linear) else last[-1].out_channels


def _torchvision(model: nn.Module) -> Architecture | None:
    if not type(model).__module__.startswith("torchvision.models"):
        return None
    num_classes, want = _num_classes(model), _signature(model)
    for name in torchvision.models.list_models(module=torchvision.models):
        builder = torchvision.models.get_model_builder(name)
        if inspect.signature(builder).return_annotation is not type(model):
            continue
        with torch.random.fork_rng(devices=[]):
            candidate = builder(weights=None, num_classes=num_classes)
        if _signature(candidate) == want:
            return Architecture("torchvision_model", {"name": name, "num_classes": num_classes})
    return None


def _importable_class(model: nn.Module) -> Architecture | None:
    cls = type(model)
    target = f"{cls.__module__}:{cls.__qualname__}"
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        return None
    try:
        with torch.random.fork_rng(devices=[]):
            candidate = _resolve(target)()
    except (TypeError, ValueError, ImportError, AttributeError, RuntimeError):
        return None
    if isinstance(candidate, nn.Module) and _signature(candidate) == _signature(model):
        return Architecture("callable_model", {"target": target})
    return None


def find_architecture(model: nn.Module, architecture: str | None = None) -> Architecture:
    """The factory that rebuilds ``model``'s architecture (see the module docstring).

    Raises:
        ValueError: none found; the message says how to name one (``architecture=``).
    """
    if architecture is not None:
        _resolve(architecture)  # fail now on a wrong target
        return Architecture("callable_model", {"target": architecture})
    for finder in (_registered, _timm, _torchvision, _importable_class):
        found = finder(model)
        if found is not None:
            return found
    cls = type(model)
    raise ValueError(
        f"cannot record how to build the teacher again ({cls.__module__}.{cls.__qualname__}: not "
        "built by a dfqkit, timm or torchvision factory, and not importable with a "
        "no-argument constructor), so its run directory could not be resumed or exported: "
        "pass architecture='package.module:function', a function without arguments that "
        "returns the float model"
    )


def _resolve(target: str) -> Any:
    module, _, name = target.partition(":")
    if not module or not name:
        raise ValueError(f"architecture={target!r} must read 'package.module:function'")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"architecture={target!r} is not callable")
    return obj


@register("models")
def callable_model(*, target: str, weights: str | None = None) -> nn.Module:
    """A model built by calling ``target`` (``'package.module:function'``) without arguments.

    Args:
        target: an importable callable returning the float model (a class or a function).
        weights: ``None`` for its own initialisation, or a local checkpoint path.

    Returns:
        The model in eval mode.
    """
    model = _resolve(target)()
    if not isinstance(model, nn.Module):
        raise ValueError(f"target={target!r} returned {type(model).__name__}, not an nn.Module")
    if weights is not None:
        load_weights(model, weights)
    return model.eval()
