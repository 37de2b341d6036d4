"""Optional packages: imported when a feature needs them, naming the extra that installs them.

    onnx = require("onnx", extra="onnx", purpose="ONNX export")

``pip install 'dfqkit[onnx]'`` (onnx, onnxruntime), ``'dfqkit[plots]'`` (matplotlib),
``'dfqkit[test]'`` (scikit-learn, for the 8×8 digits set, and everything the tests need).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from dfqkit.errors import MissingDependency


def require(name: str, *, extra: str, purpose: str) -> ModuleType:
    """Import ``name`` or raise :class:`MissingDependency` naming ``pip install
    'dfqkit[<extra>]'``."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise MissingDependency(
            f"{purpose} needs the package {name.split('.')[0]!r}, which is not installed: "
            f"pip install 'dfqkit[{extra}]'"
        ) from err
