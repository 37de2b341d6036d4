"""Where the offline zoo keeps its trained teachers (``python -m dfqkit.zoo`` writes them).

The model factories read from here (``weights="zoo"``) and the zoo writes here; neither imports
the other's module: the zoo depends on the models, not the reverse.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$DFQKIT_CACHE/zoo`` if ``DFQKIT_CACHE`` is set, else ``~/.cache/dfqkit/zoo``."""
    root = os.environ.get("DFQKIT_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "dfqkit"
    return base / "zoo"


def weights_path(name: str) -> Path:
    """Where the weights of zoo teacher ``name`` are (or will be) cached."""
    return cache_dir() / f"{name}.safetensors"


def trained_weights(name: str) -> Path:
    """The cached weights of ``name``; fails with the command that creates them if missing."""
    path = weights_path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"zoo teacher {name!r} is not trained yet (no {path}); create it with: "
            f"python -m dfqkit.zoo train {name}"
        )
    return path
