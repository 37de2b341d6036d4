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
  channel of one sign) needs int16. A weight whose grid fits neither is stored as int32 with
  zero point 0 (``DequantizeLinear`` reads int32; only constants can use it). Nothing is
  clamped or wrapped: an activation grid that no container holds raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dfqkit.quant.functional import _qparams, qrange

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
        dtype: Container, ``torch.int8``, ``torch.int16`` or (constants only) ``torch.int32``.
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


def onnx_grid(scale: Tensor, n_lo: Tensor, bits: int, *, what: str, constant: bool) -> OnnxGrid:
    """Place a k-bit grid in the narrowest ONNX integer container that holds it exactly.

    Args:
        scale: fp32 step ``s``, ``()`` or ``(c,)``.
        n_lo: Lowest grid index (integer-valued), shape of ``scale``.
        bits: ``k``.
        what: The tensor's name, for the error message.
        constant: The tensor is a constant (a weight stored as codes): it may also use an
            int32 container with zero point 0 (``y = n``; ``DequantizeLinear`` reads int32,
            ``QuantizeLinear`` cannot produce it), which holds every grid.

    Returns:
        The container, zero point and code window (see :class:`OnnxGrid`).

    Raises:
        ValueError: No container holds the grid and a zero point (an activation whose 16-bit
            grid excludes 0, or whose range is so narrow and far from 0 that ``|n| > 2^15``).
    """
    n_lo = n_lo.detach().double().round().long()
    n_hi = n_lo + (2**bits - 1)
    natural = -(n_lo + 2 ** (bits - 1))  # Eq. 14's zp = −z: then the stored value is q
    for dtype, cmin, cmax in WEIGHT_CONTAINERS if constant else ACT_CONTAINERS:
        if 2**bits > cmax - cmin + 1:
            continue
        zp_min = torch.clamp(cmin - n_lo, min=cmin)  # y = n + zp ≥ cmin and zp ≥ cmin
        zp_max = torch.clamp(cmax - n_hi, max=cmax)
        fits = zp_min <= zp_max
        if bool(fits.all()):
            zp = torch.minimum(torch.maximum(natural, zp_min), zp_max)
            full = 2**bits == cmax - cmin + 1  # the window is the container: QuantizeLinear clamps
            return OnnxGrid(dtype, scale.detach().float(), zp, n_lo + zp, n_hi + zp, full)
    if constant and bool(n_lo.abs().max() < 2**31 - 2**16):
        zp = torch.zeros_like(n_lo)
        return OnnxGrid(torch.int32, scale.detach().float(), zp, n_lo, n_hi, False)
    bad = (~fits).flatten().nonzero()[0].item() if fits.dim() else 0
    lo_i, hi_i = n_lo.flatten()[bad].item(), n_hi.flatten()[bad].item()
    where = f" (channel {bad})" if n_lo.dim() else ""
    raise ValueError(
        f"{what}{where}: its {bits}-bit grid s·[{lo_i}, {hi_i}] does not contain 0 closely "
        "enough for an ONNX QuantizeLinear container (int8, int16) to hold both its codes and "
        "a zero point; refusing to export it inexactly"
    )
