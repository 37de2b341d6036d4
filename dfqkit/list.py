"""``python -m dfqkit.list [recipes | KIND] [--markdown]``: every recipe with its title, or every
registered component, one line each.

``--markdown`` prints ``docs/components.md`` (a test keeps that file equal to this output):

    python -m dfqkit.list --markdown > docs/components.md
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence

from dfqkit.errors import RegistryError
from dfqkit.recipes import list_recipes
from dfqkit.registry import KINDS, list_components


def format_components(kind: str | None = None) -> str:
    lines = []
    current = None
    for entry in list_components(kind):
        if entry.kind != current:
            current = entry.kind
            lines.append(f"{'' if not lines else chr(10)}{current}:")
        lines.append(f"  {entry.name:<28} {entry.summary}")
    return "\n".join(lines) + "\n"


def components_markdown() -> str:
    """The text of ``docs/components.md``, generated from the registries."""
    out = [
        "# Components",
        "",
        "Generated from the registries by `python -m dfqkit.list --markdown > docs/components.md`",
        "(a test fails when this file is stale). In gin, a component is `@<kind>.<Name>`, e.g.",
        "`@losses.BNStatsLoss()`; its arguments are bindings `<kind>.<Name>.<arg> = value`.",
    ]
    for kind in KINDS:
        entries = list_components(kind)
        out += [
            "",
            f"## {kind}",
            "",
            "| gin | arguments | description | defined in |",
            "|---|---|---|---|",
        ]
        for e in entries:
            try:
                params = inspect.signature(e.obj).parameters.values()
                args = ", ".join(p.name for p in params if p.name not in ("self", "args", "kwargs"))
            except (TypeError, ValueError):
                args = ""
            module = e.where.split(":")[0]
            out.append(f"| `@{kind}.{e.name}` | {args} | {e.summary} | `{module}` |")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None, *, prog: str = "dfqkit.list") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument(
        "kind",
        nargs="?",
        default=None,
        help=f"'recipes', or a component kind: {', '.join(KINDS)} (default: every component)",
    )
    parser.add_argument("--markdown", action="store_true", help="print docs/components.md")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(components_markdown())
        return 0
    if args.kind == "recipes":
        found = list_recipes()
        width = max(len(path) for path, _ in found)
        sys.stdout.write("".join(f"{path:<{width}}  {text}\n" for path, text in found))
        return 0
    try:
        sys.stdout.write(format_components(args.kind))
    except RegistryError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
