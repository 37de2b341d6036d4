"""``python -m dfqkit.list [KIND]``: every registered component with its one-line description."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dfqkit.registry import KINDS, RegistryError, list_components


def format_components(kind: str | None = None) -> str:
    lines = []
    current = None
    for entry in list_components(kind):
        if entry.kind != current:
            current = entry.kind
            lines.append(f"{'' if not lines else chr(10)}{current}:")
        lines.append(f"  {entry.name:<28} {entry.summary}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dfqkit.list", description=__doc__.split("\n")[0])
    parser.add_argument("kind", nargs="?", default=None, help=f"one of {', '.join(KINDS)}")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(format_components(args.kind))
    except RegistryError as err:
        print(f"dfqkit.list: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
