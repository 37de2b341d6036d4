"""Optional packages: imported when a feature needs them, naming the extra that installs them.

    onnx = require("onnx", extra="onnx", purpose="ONNX export")

``pip install 'dfqkit[onnx]'`` (onnx, onnxruntime), ``'dfqkit[plots]'`` (matplotlib),
``'dfqkit[data]'`` (scikit-learn: the 8×8 digits and the bundled photos), ``'dfqkit[test]'``
(everything the tests need).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from dfqkit.errors import MissingDependency


def require(name: str, *, extra: str, purpose: str, package: str | None = None) -> ModuleType:
    """Import ``name`` or raise :class:`MissingDependency` naming the package to install (its
    pip name ``package``, default the module's top-level name) and the dfqkit extra that has
    it."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        pip_name = package or name.split(".")[0]
        raise MissingDependency(
            f"{purpose} needs {pip_name}, which is not installed: pip install {pip_name} "
            f"(or pip install 'dfqkit[{extra}]')"
        ) from err
