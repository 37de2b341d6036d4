"""What the shipped recipes are, and what a recipe lets you set.

``dfqkit list recipes`` prints every recipe with its one-line title (the first line of its
header comment); ``dfqkit train --gin RECIPE --help`` prints :func:`describe`: the title, the
REQUIRED macros, the commonly overridden ones (the first "Commonly overridden:" line in the
headers of the recipe and the files it includes, plus the standard macros) and every macro with
its value.
"""

from __future__ import annotations

import re
from pathlib import Path

import gin

from dfqkit import config as cfg

COMMONLY = re.compile(r"Commonly overridden:\s*(?P<names>[A-Z0-9_, ]+)")


def header(path: Path) -> list[str]:
    """The comment lines at the top of a gin file, without ``#``."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def title(path: Path) -> str:
    """The first line of ``path``'s header comment (``""`` without one)."""
    lines = header(path)
    return lines[0] if lines else ""


def list_recipes(root: Path | None = None) -> list[tuple[str, str]]:
    """``(path relative to the source tree, title)`` of every recipe, sorted by path."""
    root = root or cfg.REPO_ROOT
    return [(str(p.relative_to(root)), title(p)) for p in sorted((root / "recipes").rglob("*.gin"))]


def headers(path: Path, seen: frozenset[Path] = frozenset()) -> list[str]:
    """The header lines of ``path`` and of every file it includes (recursively, in order)."""
    if path in seen:
        return []
    lines = header(path)
    for line in path.read_text().splitlines():
        match = cfg.INCLUDE.match(line)
        if match:
            lines += headers(cfg.resolve_gin_file(match.group("path")), seen | {path})
    return lines


def _macros() -> dict[str, str]:
    return {
        key.rpartition("/")[0]: value
        for key, value in (
            (k, params.get("value")) for k, params in cfg.snapshot().items() if params
        )
        if key.endswith("/gin.macro")
    }


def describe(gin_file: str | Path) -> str:
    """The recipe's title, REQUIRED macros, commonly overridden macros and every macro's
    value, as text for ``--help``."""
    path = cfg.resolve_gin_file(gin_file)
    files = cfg.parse([path], finalize=False, allow_required=True)
    required = cfg.required_macros()
    macros = _macros()
    gin.clear_config()
    found = COMMONLY.search(" ".join(headers(files[0])))
    common = [n.strip() for n in found.group("names").split(",") if n.strip()] if found else []
    common = list(dict.fromkeys([*common, *cfg.STANDARD_MACROS]))
    lines = [f"{cfg.recipe_name(path)}: {title(path) or '(no header comment)'}", ""]
    lines.append(
        'REQUIRED (set each with --gin_param "NAME = value"): ' + (", ".join(required) or "none")
    )
    lines.append("Commonly overridden: " + ", ".join(n for n in common if n in macros))
    lines += ["", 'Macros (--gin_param "NAME = VALUE"):']
    width = max((len(n) for n in macros), default=0)
    for name in sorted(macros):
        value = "REQUIRED" if name in required else macros[name]
        lines.append(f"  {name:<{width}} = {value}")
    lines += [
        "",
        "Any binding of the gin root works the same way, e.g. --gin_param "
        "\"train.mixed_precision = 'bf16'\" (all of them: help(dfqkit.build.build_run)).",
    ]
    return "\n".join(lines) + "\n"
