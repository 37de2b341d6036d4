"""dfqkit: data-free quantization as interchangeable, gin-wired components.

``dfqkit.quantize`` is :func:`dfqkit.api.quantize`, imported on first use so that importing a
part of dfqkit (``dfqkit.errors``, ``dfqkit.registry``) stays cheap.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["quantize"]


def __getattr__(name: str) -> Any:
    if name == "quantize":
        from dfqkit.api import quantize  # lazy: the whole toolkit behind one function

        return quantize
    raise AttributeError(f"module 'dfqkit' has no attribute {name!r}")
