"""Whether what a configuration binds is read by anything, and hints for gin's own errors.

A typo in a binding must not run the recipe as if it were not there. Three checks:

* :func:`unread_macros` (before anything is built): a macro set on the command line or at the
  top of a given file that no binding references (``HAEDS = 0``) — with a "did you mean".
* :func:`unread_bindings` (after the run is built, before any step): a command-line binding of a
  configurable that nothing called (``mixers.Mixup.alpha`` in a run without Mixup).
* :func:`hint` turns gin's "No configurable matching 'mixers.MixUp'" and "doesn't have a
  parameter named 'mixr'" into the same errors with the closest registered names.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from gin import config as gin_config

MACRO = "gin.macro"
#: a statement ``NAME = value`` at the start of a line (no dot: a macro, not a binding)
MACRO_STATEMENT = re.compile(r"^(?P<name>[A-Za-z_]\w*)\s*=(?!=)")
#: bound by dfqkit when it opens a run directory, read only by runs that keep files in it
INTERNAL_MACROS = frozenset({"RUN_DIR"})


def suggest(name: str, options: Iterable[str], n: int = 3) -> str:
    """`` Did you mean 'A', 'B'?`` for the options closest to ``name`` (or ``""``)."""
    close = difflib.get_close_matches(name, sorted(set(options)), n=n, cutoff=0.6)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""


def macros_set(gin_files: Sequence[Path], gin_params: Sequence[str]) -> set[str]:
    """Macros set by the command-line bindings or at the top level of the given files (their
    includes are the fragments' business)."""
    lines = [ln for f in gin_files for ln in Path(f).read_text().splitlines()]
    lines += [ln for p in gin_params for ln in p.splitlines()]
    return {m.group("name") for m in map(MACRO_STATEMENT.match, lines) if m}


def defined_macros() -> set[str]:
    return {scope for scope, selector in gin_config._CONFIG if selector == MACRO}


def referenced_macros() -> set[str]:
    """Macros that some binding (or another macro) of the parsed configuration references."""
    return {
        ref.scoped_selector.rpartition("/")[0]
        for ref in gin_config.iterate_references(gin_config._CONFIG)
        if ref.configurable.wrapped is gin_config.macro
    }


def unread_macros(names: Iterable[str]) -> list[str]:
    """Errors, one per macro of ``names`` that is set but referenced by nothing."""
    referenced = referenced_macros()
    errors = []
    for name in sorted(set(names) - referenced - INTERNAL_MACROS):
        if name in defined_macros():
            hint_ = suggest(name, referenced)
            errors.append(f"macro {name} is set but nothing in the configuration reads it.{hint_}")
    return errors


def bound_keys() -> set[tuple[str, str, str]]:
    """Every ``(scope, configurable, parameter)`` of the parsed configuration (macros as
    ``(NAME, "gin.macro", "value")``)."""
    return {(s, sel, p) for (s, sel), params in gin_config._CONFIG.items() for p in params}


def values() -> dict[tuple[str, str, str], str]:
    return {
        (s, sel, p): repr(v)
        for (s, sel), params in gin_config._CONFIG.items()
        for p, v in params.items()
    }


def display(key: tuple[str, str, str]) -> str:
    """A key as a user writes it: ``EPOCHS``, ``mixers.Mixup.alpha``, ``gen/losses.X.weight``."""
    scope, selector, param = key
    if selector == MACRO:
        return scope
    short = selector.removeprefix("dfqkit.")
    return f"{scope}/{short}.{param}" if scope else f"{short}.{param}"


def _applies(scope: str, called_in: str) -> bool:
    """Whether a binding in ``scope`` applies to a call made in scope ``called_in`` (an
    unscoped binding applies everywhere; ``a/x`` to a call made inside both ``a`` and ``x``,
    such as the configurable a macro ``EVAL_DATA = @data.x()`` builds in scope ``EVAL_DATA``)."""
    return not scope or set(scope.split("/")) <= set(called_in.split("/"))


def unread_bindings(keys: Iterable[tuple[str, str, str]]) -> list[str]:
    """Errors, one per binding of ``keys`` whose configurable the built run never called (read
    gin's operative configuration, complete once every part is built)."""
    operative = gin_config._OPERATIVE_CONFIG
    called = {(s, sel) for s, sel in operative}
    errors = []
    for key in sorted(keys):
        scope, selector, _ = key
        if selector == MACRO or any(_applies(scope, s) for s, sel in called if sel == selector):
            continue
        used = [display((s, sel, "")).rstrip(".") for s, sel in called if sel != MACRO]
        part = display((scope, selector, "")).rstrip(".")
        errors.append(
            f"binding {display(key)} is read by nothing: {part} is not part of this run (the "
            f"parts built: {', '.join(sorted(used)[:12])}, ...).{suggest(part, used)}"
        )
    return errors


def _registered() -> list[str]:
    return [s.removeprefix("dfqkit.") for s in gin_config._REGISTRY._selector_map]


def hint(message: str) -> str:
    """The closest registered configurables or parameters for gin's lookup errors (or
    ``""``)."""
    found = re.search(r"No configurable matching (?:reference )?'@?([\w./]+?)(?:\(\))?'", message)
    if found:
        name = found.group(1).rpartition("/")[2]
        return suggest(name, _registered()) or " (python -m dfqkit.list shows every component)"
    found = re.search(r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'", message)
    if found:
        configurable = gin_config._REGISTRY.get_match(found.group(1))
        if configurable is not None:
            try:
                params = inspect.signature(configurable.wrapped).parameters
            except (TypeError, ValueError):
                return ""
            return suggest(found.group(2), [p for p in params if p not in ("self", "args")])
    return ""
