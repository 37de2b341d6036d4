"""dfqkit: data-free quantization as interchangeable, gin-wired components."""

__version__ = "0.1.0"


def quantize(model, **kwargs):
    """Quantize ``model`` data-free; see :func:`dfqkit.api.quantize` for the arguments."""
    from dfqkit.api import quantize as _quantize

    return _quantize(model, **kwargs)


__all__ = ["quantize"]
