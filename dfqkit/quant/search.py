"""Clip-range search: the range whose quantization error is smallest (BRECQ/QDrop/Genie init).

Genie-M (and BRECQ, QDrop before it) initialises every scale by trying clip ratios
``r = 1.00, 0.99, ..., 0.01`` of the min/max range and keeping, per channel (weights) or per
tensor (activations), the one with the smallest mean ``|x - x_hat|^p`` error, ``p = 2.4``.
The grids here are dfqkit's Eq. 14 grid (:mod:`dfqkit.quant.functional`), so the result is a
``(lo, hi)`` pair every dfqkit quantizer understands.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dfqkit.quant.functional import _codes, _qparams

#: Genie's candidate clip ratios: 1.00 down to 0.01 in steps of 0.01.
RATIOS: tuple[float, ...] = tuple(round(1.0 - 0.01 * i, 2) for i in range(100))


def _error(x: Tensor, lo: Tensor, hi: Tensor, bits: int, p: float) -> Tensor:
    """Mean ``|x - x_hat|^p`` along dim 1 of ``x`` (rows = channels or one row)."""
    scale, inv_scale, zero_point = _qparams(lo, hi, bits)
    x_hat = _codes(x, inv_scale, zero_point, bits).add_(zero_point).mul_(scale)
    return x_hat.sub_(x).abs_().pow_(p).mean(dim=1)


def search_asymmetric(x: Tensor, bits: int, *, p: float = 2.4) -> tuple[Tensor, Tensor]:
    """Per-row asymmetric range with the smallest ``L_p`` error (Genie's weight init).

    Args:
        x: ``(rows, n)`` fp32, e.g. a weight reshaped to ``(c_out, -1)``.
        bits: bit width.
        p: error exponent.

    Returns:
        ``(lo, hi)``, each ``(rows,)``: ``r · (min, max)`` of the row for the best ratio ``r``.
    """
    x = x.detach().float()
    x_min, x_max = torch.aminmax(x, dim=1)
    best = torch.full_like(x_min, float("inf"))
    best_lo, best_hi = x_min.clone(), x_max.clone()
    for r in RATIOS:
        lo, hi = x_min * r, x_max * r
        err = _error(x, lo[:, None], hi[:, None], bits, p)
        better = err < best
        best = torch.where(better, err, best)
        best_lo = torch.where(better, lo, best_lo)
        best_hi = torch.where(better, hi, best_hi)
    return best_lo, best_hi


def symmetric_bounds(scale: Tensor, signed: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """The Eq. 14 range of the grid ``scale · {c_min, ..., c_max}``: signed codes
    ``-2^(k-1) .. 2^(k-1)-1`` or unsigned ``0 .. 2^k-1`` (``signed`` a bool tensor)."""
    c_min = signed.to(scale.dtype) * -(2 ** (bits - 1))
    return c_min * scale, (c_min + (2**bits - 1)) * scale


def search_symmetric(
    x: Tensor, bits: int, signed: Tensor, *, p: float = 2.4, max_elements: int | None = None
) -> Tensor:
    """The step size of a symmetric grid (LSQ/Genie activations) with the smallest ``L_p`` error.

    Signed grids are ``s · {-2^(k-1), ..., 2^(k-1)-1}`` with ``s = 2 r max|x| / (2^k - 1)``;
    unsigned ``s · {0, ..., 2^k - 1}`` with ``s = r max(x) / (2^k - 1)`` (Genie's formulas).

    The search evaluates 100 candidate grids, each over every element: on a 224-px activation
    that is seconds per tensor. With ``max_elements``, a tensor with more elements is searched
    on an evenly strided subsample of at most that many (the candidates still come from the
    whole tensor's extreme); a tensor that fits is searched whole, so the result is unchanged.

    Args:
        x: any shape, fp32.
        bits: bit width.
        signed: 0-dim bool tensor.
        p: error exponent.
        max_elements: the most elements the error is evaluated on (``None``: all).

    Returns:
        0-dim step size ``s``.
    """
    if max_elements is not None and max_elements < 1:
        raise ValueError(f"max_elements must be >= 1 or None, got {max_elements!r}")
    flat = x.detach().float().reshape(1, -1)
    top = torch.where(signed, flat.abs().amax(), flat.amax().clamp_min(0.0))
    if max_elements is not None and flat.shape[1] > max_elements:
        flat = flat[:, :: -(-flat.shape[1] // max_elements)]
    span = torch.where(signed, 2.0 * top, top) / (2**bits - 1)
    best = torch.full((), float("inf"), device=flat.device)
    best_scale = span.clamp_min(1e-8)
    for r in RATIOS:
        scale = (span * r).clamp_min(1e-8)
        lo, hi = symmetric_bounds(scale, signed, bits)
        err = _error(flat, lo, hi, bits, p)[0]
        better = err < best
        best = torch.where(better, err, best)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale
