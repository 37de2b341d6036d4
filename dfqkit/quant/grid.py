"""The integer grid of Eq. 14 (the paper's supplementary): code range and scale/zero point of a
range ``[lo, hi]`` at ``k`` bits. Shared by fake quantization, the exports' integer codes and the
range searches, so every path computes the same grid."""

from __future__ import annotations

from torch import Tensor


def qrange(bits: int) -> tuple[int, int]:
    """The signed integer code range ``(-2^(k-1), 2^(k-1) - 1)``."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _qparams(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(scale, 1/scale, zero_point)``; the reciprocal is shared so codes and fake quant agree."""
    scale = (hi - lo).clamp_min_(1e-8).div_(2**bits - 1)
    inv_scale = scale.reciprocal()
    zero_point = (lo * inv_scale).round_().add_(2 ** (bits - 1))
    return scale, inv_scale, zero_point
