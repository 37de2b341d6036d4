"""The part of a run's gin configuration that rebuilding its student needs.

An export must not depend on anything that only training used: a run whose recipe names a
user's mixer, loss or generator (registered by a module that lives next to the run) must load
anywhere the model and quantizers are importable. :func:`student_config` keeps, from the
run's operative configuration, only the bindings reachable from ``train.teacher`` and
``train.quant``: those two bindings, every binding of a configurable they reference (directly
or through other references and macros, in the scopes those references open), every macro on
the way, and the ``import`` lines that define one of the configurables kept.

The text is parsed with gin's own parser but without resolving any name, so configurables that
are not importable here (or at load time) are no obstacle; only the kept ones must be.
Scoping is approximated from above: a binding ``a/b/X.p`` is kept when ``X`` is reachable
through references that opened the scopes ``a`` and ``b`` (in any order), so a kept set may
hold a binding gin would not apply, never miss one it would.
"""

from __future__ import annotations

import pprint
from collections.abc import Iterator

import gin
from gin import config_parser

from dfqkit import config as cfg

#: the ``train`` parameters a student is rebuilt from (:func:`dfqkit.export.load_quantized`)
ROOTS: tuple[tuple[str, str], ...] = (("train", "teacher"), ("train", "quant"))
#: kept with what they reach when the run bound them: the data-free transforms change the
#: student's structure (ReLU6 → ReLU, a bias added), so a rebuild applies them again
OPTIONAL_ROOTS: tuple[tuple[str, str], ...] = (("train", "transforms"),)


class _Reference:
    """``@scope/name`` or ``@scope/name()`` as parsed, printed back the same way."""

    def __init__(self, name: str, evaluate: bool) -> None:
        self.name, self.evaluate = name, evaluate

    def __repr__(self) -> str:
        return f"@{self.name}()" if self.evaluate else f"@{self.name}"


class _Macro:
    """``%NAME`` as parsed, printed back the same way."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"%{self.name}"


class _Delegate(config_parser.ParserDelegate):
    """Parses references and macros into placeholders instead of resolving them."""

    def configurable_reference(self, scoped_configurable_name: str, evaluate: bool) -> _Reference:
        return _Reference(scoped_configurable_name, evaluate)

    def macro(self, macro_name: str) -> _Macro:
        return _Macro(macro_name)


def _references(value: object) -> Iterator[_Reference | _Macro]:
    if isinstance(value, _Reference | _Macro):
        yield value
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from _references(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _references(key)
            yield from _references(item)


def _same_configurable(selector: str, name: str) -> bool:
    """gin's partial selectors: ``mnist_resnet`` names ``models.mnist_resnet`` and back."""
    return selector == name or name.endswith("." + selector) or selector.endswith("." + name)


def _key(b: config_parser.BindingStatement) -> str:
    scoped = f"{b.scope}/{b.selector}" if b.scope else b.selector
    return f"{scoped}.{b.arg_name}" if b.arg_name else scoped


def _format(b: config_parser.BindingStatement) -> str:
    return f"{_key(b)} = {pprint.pformat(b.value, width=90)}"


def _defining_modules(names: set[str]) -> set[str] | None:
    """The Python modules defining the configurables ``names``; None if one is unknown here."""
    modules = set()
    for name in names:
        configurable = gin.config._REGISTRY.get_match(name)
        if configurable is None:
            return None
        modules.add(configurable.wrapped.__module__)
    return modules


def student_config(
    operative_config: str,
    roots: tuple[tuple[str, str], ...] = ROOTS,
    optional: tuple[tuple[str, str], ...] = OPTIONAL_ROOTS,
) -> str:
    """The gin text rebuilding ``train.teacher`` and ``train.quant`` (and ``train.transforms``
    when bound) and nothing else.

    Args:
        operative_config: A run's ``operative_config.gin`` text.
        roots: ``(configurable, parameter)`` bindings to keep with everything they reach.
        optional: the same, kept only when the configuration binds them.

    Returns:
        A gin configuration: kept imports, macros, then bindings, one statement per line.

    Raises:
        ValueError: A root binding is missing from ``operative_config``.
    """
    cfg.register_configurables()  # so the kept configurables' modules can be looked up
    statements = list(config_parser.ConfigParser(operative_config, _Delegate()))
    bindings = [s for s in statements if isinstance(s, config_parser.BindingStatement)]
    kept: dict[int, config_parser.BindingStatement] = {}
    queue: list[tuple[object, frozenset[str]]] = []
    visited: set[tuple[str, frozenset[str]]] = set()
    configurables: set[str] = set()

    def keep(b: config_parser.BindingStatement, scopes: frozenset[str]) -> None:
        if id(b) not in kept:
            kept[id(b)] = b
        queue.append((b.value, scopes))

    for selector, arg in (*roots, *optional):
        found = [b for b in bindings if (b.scope, b.selector, b.arg_name) == ("", selector, arg)]
        if not found and (selector, arg) in optional:
            continue
        if not found:
            raise ValueError(f"the configuration has no binding {selector}.{arg}")
        for b in found:
            keep(b, frozenset())
    while queue:
        value, scopes = queue.pop()
        for ref in _references(value):
            *scope_parts, name = ref.name.split("/")
            active = scopes | set(scope_parts)
            if (ref.name, active) in visited:
                continue
            visited.add((ref.name, active))
            if isinstance(ref, _Macro):  # gin evaluates a macro in a scope named after it
                for b in bindings:
                    if not b.arg_name and _key(b) == ref.name:
                        keep(b, active | {name})
                continue
            configurables.add(name)
            for b in bindings:
                scope = set(b.scope.split("/")) - {""}
                if b.arg_name and _same_configurable(b.selector, name) and scope <= active:
                    keep(b, active)
    modules = _defining_modules(configurables)
    imports = [
        s.format()
        for s in statements
        if isinstance(s, config_parser.ImportStatement)
        and (modules is None or any(m == s.module or m.startswith(s.module + ".") for m in modules))
    ]
    ordered = [b for b in bindings if id(b) in kept]  # the operative file's order
    macros = [_format(b) for b in ordered if not b.arg_name]
    params = [_format(b) for b in ordered if b.arg_name]
    return "\n".join([*imports, *macros, *params]) + "\n"
