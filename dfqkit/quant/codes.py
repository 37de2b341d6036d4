"""Integer codes of quantized tensors and the integer containers the exports store them in.

Every quantizer of dfqkit dequantizes onto a *grid* ``s · n`` with integer indices
``n ∈ [n_lo, n_lo + 2^k − 1]``. For Eq. 14 (:mod:`dfqkit.quant.functional`) ``n = q + z``
with the code ``q ∈ [−2^(k−1), 2^(k−1) − 1]``, so ``n_lo = z − 2^(k−1) = round(l / s)``;
0 is on the grid exactly when ``n_lo ≤ 0 ≤ n_lo + 2^k − 1``, i.e. when the rounded range
contains 0.

* **safetensors** stores Eq. 14's ``q`` (signed k-bit), ``s`` and ``z`` (fp32): ``q`` fits an
  int8 container for ``k ≤ 8`` and an int16 one for ``k ≤ 16``, whatever the range.
* **ONNX** ``DequantizeLinear`` computes ``(y − zp) · s`` with the stored value ``y`` *and* the
  zero point ``zp`` of the same integer type. So ``n = y − zp`` and the container must hold
  both ``zp`` and the window ``[n_lo + zp, n_hi + zp]``. :func:`onnx_grid` picks the narrowest
  container (int8, else int16) and a zero point in it; Eq. 14's own ``zp = −z`` when it fits,
  so that ``y = q``. An 8-bit grid fills int8 completely, so it fits only with ``zp = −z`` and
  only when 0 is on the grid; a grid that excludes 0 (a range ``[0.2, 10]`` at 8 bits, a weight
  channel of one sign) needs int16. Nothing is clamped or wrapped: a grid that no container
  holds raises (the ONNX export then refuses an activation and stores a weight as its exact
  dequantized float values, with a warning).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dfqkit.quant.grid import _qparams, qrange

_UINT8, _INT8, _INT16 = (torch.uint8, 0, 255), (torch.int8, -128, 127), (torch.int16, -32768, 32767)
#: ONNX ``QuantizeLinear``/``DequantizeLinear`` containers ``(dtype, min, max)`` tried in order,
#: narrowest first (int16 needs opset 21). Activations prefer uint8 and weights int8, the
#: convention of onnxruntime's integer kernels (its QDQ fusion into QLinearConv on x86).
ACT_CONTAINERS: tuple[tuple[torch.dtype, int, int], ...] = (_UINT8, _INT8, _INT16)
WEIGHT_CONTAINERS: tuple[tuple[torch.dtype, int, int], ...] = (_INT8, _INT16)


def code_dtype(bits: int) -> torch.dtype:
    """The signed container of Eq. 14 codes ``q`` at ``bits`` bits (int8 up to 8, else int16)."""
    return torch.int8 if bits <= 8 else torch.int16


def pack_codes(q: Tensor, bits: int, *, what: str) -> Tensor:
    """Eq. 14 codes ``q`` (fp32 integers) in their container, refusing any value outside
    ``[−2^(k−1), 2^(k−1) − 1]`` instead of wrapping it."""
    qmin, qmax = qrange(bits)
    if q.numel() and (q.min() < qmin or q.max() > qmax or not torch.equal(q, q.round())):
        raise ValueError(
            f"{what}: codes in [{q.min().item():g}, {q.max().item():g}] are not {bits}-bit "
            f"integers in [{qmin}, {qmax}]"
        )
    return q.to(code_dtype(bits)).contiguous()


def weight_codes(layer: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """``(q, scale, z)`` of a quantized layer's weight, ``ŵ = scale · (q + z)`` (Eq. 14).

    Uses the weight quantizer's ``codes(w)``; a symmetric quantizer returns ``(q, scale)`` and
    gets ``z = 0``. ``scale`` and ``z`` keep the quantizer's shape (``(c, 1, …)`` or ``()``).
    """
    out = layer.weight_quant.codes(layer.weight)
    if len(out) == 2:  # symmetric: (q, scale), zero point 0
        q, scale = out
        return q, scale, torch.zeros_like(scale)
    return out


def eq14_grid(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """``(s, n_lo)`` of Eq. 14 on ``[lo, hi]``: the fake-quantized value is ``s · n`` with
    ``n = clamp(round(x / s), n_lo, n_lo + 2^k − 1)`` (up to the float rounding of ``x / s``
    versus ``x · (1/s) − z``, which can differ exactly at a tie between two codes)."""
    scale, _, zero_point = _qparams(lo.detach().float(), hi.detach().float(), bits)
    return scale, zero_point - 2 ** (bits - 1)


@dataclass(frozen=True)
class OnnxGrid:
    """A k-bit grid ``s · [n_lo, n_lo + 2^k − 1]`` as ONNX ``DequantizeLinear`` holds it.

    Attributes:
        dtype: Container, ``torch.uint8``, ``torch.int8`` or ``torch.int16``.
        scale: fp32 ``s``, ``()`` or ``(c,)``.
        zero_point: ``zp`` (int64 values), shape of ``scale``; ``n = y − zp``.
        low: Lowest container value of the grid, ``n_lo + zp``.
        high: Highest, ``n_lo + 2^k − 1 + zp``.
        full: The grid fills the container, so ``QuantizeLinear``'s saturation is its clamp.
    """

    dtype: torch.dtype
    scale: Tensor
    zero_point: Tensor
    low: Tensor
    high: Tensor
    full: bool


def onnx_grid(scale: Tensor, n_lo: Tensor, bits: int, *, what: str, weight: bool) -> OnnxGrid:
    """Place a k-bit grid in the narrowest ONNX integer container that holds it exactly.

    Args:
        scale: fp32 step ``s``, ``()`` or ``(c,)``.
        n_lo: Lowest grid index (integer-valued), shape of ``scale``.
        bits: ``k``.
        what: The tensor's name, for the error message.
        weight: Try the weight containers (int8 first) instead of the activation ones
            (uint8 first).

    Returns:
        The container, zero point and code window (see :class:`OnnxGrid`).

    Raises:
        ValueError: No container holds the grid and a zero point: a 16-bit grid that excludes
            0, or a range so narrow and far from 0 that ``|n| > 2^15`` (a weight channel whose
            values are all equal has the range ``1e-8`` of Eq. 14's floor).
    """
    n_lo = n_lo.detach().double().round().long()
    n_hi = n_lo + (2**bits - 1)
    natural = -(n_lo + 2 ** (bits - 1))  # Eq. 14's zp = −z: then the stored value is q
    for dtype, cmin, cmax in WEIGHT_CONTAINERS if weight else ACT_CONTAINERS:
        if 2**bits > cmax - cmin + 1:
            continue
        zp_min = torch.clamp(cmin - n_lo, min=cmin)  # y = n + zp ≥ cmin and zp ≥ cmin
        zp_max = torch.clamp(cmax - n_hi, max=cmax)
        fits = zp_min <= zp_max
        if bool(fits.all()):
            zp = torch.minimum(torch.maximum(natural, zp_min), zp_max)
            full = 2**bits == cmax - cmin + 1  # the window is the container: QuantizeLinear clamps
            return OnnxGrid(dtype, scale.detach().float(), zp, n_lo + zp, n_hi + zp, full)
    bad = (~fits).flatten().nonzero()[0].item() if fits.dim() else 0
    lo_i, hi_i = n_lo.flatten()[bad].item(), n_hi.flatten()[bad].item()
    where = f" (channel {bad})" if n_lo.dim() else ""
    raise ValueError(
        f"{what}{where}: its {bits}-bit grid s·[{lo_i}, {hi_i}] lies too far from 0 for an ONNX "
        "QuantizeLinear/DequantizeLinear container (int8, int16) to hold both its codes and a "
        "zero point"
    )
