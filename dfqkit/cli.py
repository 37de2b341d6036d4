"""The ``dfqkit`` command (also ``python -m dfqkit``): one entry with subcommands.

    dfqkit train --gin RECIPE [--gin_param "KEY = VALUE" ...] [--output_dir DIR] [--resume]
    dfqkit train --gin RECIPE --help       # the recipe's REQUIRED and common macros
    dfqkit list [recipes | KIND]           # recipes with their titles, or components
    dfqkit zoo {list,train,path} ...       # the offline teachers
    dfqkit bench {accuracy,speed,calibration} ...
    dfqkit diagnose --run DIR ...
    dfqkit export --run DIR [--format safetensors|onnx] [--which best|last]

Each subcommand is the module of the same name (``python -m dfqkit.train`` etc. keep working).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS = {
    "train": ("dfqkit.train", "train a recipe, or resume a run"),
    "list": ("dfqkit.list", "list recipes or registered components"),
    "zoo": ("dfqkit.zoo", "train, list and locate the offline teachers"),
    "bench": ("dfqkit.bench", "accuracy tables, speed and calibration benchmarks"),
    "diagnose": ("dfqkit.diagnose", "mode-collapse diagnostic of runs' synthetic data"),
    "export": ("dfqkit.export", "export a run's quantized student (safetensors, ONNX)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: dfqkit COMMAND [ARGS ...]   (dfqkit COMMAND --help for its arguments)",
        "",
        __doc__.split("\n")[0],
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        sys.stderr.write(f"dfqkit: unknown command {name!r}.{hint}\n\n{usage()}")
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest, prog=f"dfqkit {name}")


if __name__ == "__main__":
    sys.exit(main())
