"""Component registries.

A component is registered where it is defined::

    @register("losses")
    class BNStatsLoss(Loss):
        ...

which records it for :func:`get` / :func:`list_components` and registers it with gin under the
module ``dfqkit.losses``, so a recipe binds ``train.losses = [@losses.BNStatsLoss()]``.
Third-party packages add components through the ``dfqkit.plugins`` entry-point group: each entry
point names a module (or a callable) that registers its components when loaded.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any, TypeVar

import gin

from dfqkit.errors import RegistryError

KINDS: tuple[str, ...] = ("models", "generators", "mixers", "losses", "quantizers", "ptq")
PLUGIN_GROUP = "dfqkit.plugins"

T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    obj: Any
    where: str  # "module:qualname", to say where a duplicate's first definition lives

    @property
    def summary(self) -> str:
        """The first line of the component's own docstring (never one inherited from a base
        class, which would describe the base)."""
        own = vars(self.obj).get("__doc__") if inspect.isclass(self.obj) else self.obj.__doc__
        doc = inspect.cleandoc(own) if isinstance(own, str) else ""
        return doc.splitlines()[0] if doc else "(no description)"


_REGISTRY: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
_builtins_loaded = False
_plugins_loaded = False


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def _check_kind(kind: str) -> None:
    if kind not in _REGISTRY:
        hint = _suggest(kind, list(KINDS))
        raise RegistryError(
            f"unknown component kind {kind!r}; valid kinds: {', '.join(KINDS)}.{hint}"
        )


def register(kind: str, name: str | None = None) -> Callable[[T], T]:
    """Class/function decorator registering a component of ``kind`` (also with gin)."""
    _check_kind(kind)

    def decorator(obj: T) -> T:
        key = name or obj.__name__
        where = f"{obj.__module__}:{obj.__qualname__}"
        previous = _REGISTRY[kind].get(key)
        if previous is not None:
            raise RegistryError(
                f"duplicate {kind} component {key!r}: already registered by {previous.where}, "
                f"now again by {where}; choose another name"
            )
        if kind == "models" and inspect.isfunction(obj):
            obj = _recording(obj, key)
        _REGISTRY[kind][key] = Entry(kind, key, obj, where)
        gin.external_configurable(obj, name=key, module=f"dfqkit.{kind}")
        return obj

    return decorator


#: The attribute where a model built by a registered factory keeps ``(factory, arguments)``.
BUILT_BY = "dfqkit_built_by"


def _recording(factory: Callable[..., Any], key: str) -> Callable[..., Any]:
    """``factory`` returning models that remember how they were built (``BUILT_BY``: the
    registered name and every argument, defaults included), so a run can record how to build
    a model handed to it (``dfqkit.quantize``)."""
    signature = inspect.signature(factory)

    @functools.wraps(factory)
    def build(*args: Any, **kwargs: Any) -> Any:
        model = factory(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        try:
            setattr(model, BUILT_BY, (key, dict(bound.arguments)))
        except AttributeError:  # not a module we can annotate
            pass
        return model

    return build


def load_builtins() -> None:
    """Import the packages whose modules register dfqkit's own components."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for kind in KINDS:
        importlib.import_module(f"dfqkit.{'quant' if kind == 'quantizers' else kind}")


def load_plugins() -> list[str]:
    """Load every ``dfqkit.plugins`` entry point; returns the names loaded."""
    global _plugins_loaded
    if _plugins_loaded:
        return []
    _plugins_loaded = True
    loaded = []
    for ep in metadata.entry_points(group=PLUGIN_GROUP):
        obj = ep.load()
        if callable(obj) and not inspect.ismodule(obj):
            obj()
        loaded.append(ep.name)
    return loaded


def load_all() -> None:
    load_builtins()
    load_plugins()


def get(kind: str, name: str) -> Any:
    """The registered object ``name`` of ``kind``; unknown names fail with the valid names."""
    _check_kind(kind)
    load_all()
    try:
        return _REGISTRY[kind][name].obj
    except KeyError:
        valid = sorted(_REGISTRY[kind])
        raise RegistryError(
            f"unknown {kind} component {name!r}; valid names: {', '.join(valid) or '(none)'}."
            f"{_suggest(name, valid)}"
        ) from None


def list_components(kind: str | None = None) -> list[Entry]:
    """Registered entries, of one kind or all, sorted by kind then name."""
    load_all()
    kinds = KINDS if kind is None else (kind,)
    for k in kinds:
        _check_kind(k)
    return [_REGISTRY[k][n] for k in kinds for n in sorted(_REGISTRY[k])]
