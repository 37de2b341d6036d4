"""Loading dataset pickles (CIFAR's numpy arrays) without letting them run code.

A pickle names the callables it needs to rebuild its objects; a malicious file can name
``os.system``. :func:`safe_load` resolves only an allow-list of numpy array constructors, so a file
that asks for anything else is refused before any of its code runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import pickle
from pathlib import Path
from typing import Any

# numpy 2 moved numpy.core to numpy._core; pickles written by either name both.
_NUMPY_CORE = "numpy._core" if importlib.util.find_spec("numpy._core") else "numpy.core"

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles from Python 3 spell bytes
    }
)


class SafeUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only :data:`ALLOWED_GLOBALS` (numpy arrays, builtins)."""

    def find_class(self, module: str, name: str) -> Any:
        canonical = module.replace("numpy._core", "numpy.core", 1)
        if (canonical, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global {module}.{name}: only numpy arrays and plain "
                "Python containers are allowed in dataset files"
            )
        canonical = canonical.replace("numpy.core", _NUMPY_CORE, 1)
        return getattr(importlib.import_module(canonical), name)


def safe_load(path: str | Path, *, encoding: str = "latin1") -> Any:
    """Unpickle ``path`` allowing only numpy arrays and builtin containers.

    Args:
        path: pickle file (e.g. CIFAR's ``test_batch``).
        encoding: how Python 2 ``str`` objects are decoded; ``"latin1"`` keeps numpy array
            buffers of Python 2 pickles intact.

    Raises:
        pickle.UnpicklingError: the file names a callable outside the allow-list.
    """
    with open(path, "rb") as f:
        try:
            return SafeUnpickler(f, encoding=encoding).load()
        except pickle.UnpicklingError as err:
            raise pickle.UnpicklingError(f"{path}: {err}") from None
