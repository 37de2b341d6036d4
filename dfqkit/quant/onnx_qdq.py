"""What a quantizer becomes in an ONNX export: QuantizeLinear/DequantizeLinear with constants.

While :data:`dfqkit.quant.functional._ONNX_EXPORT` is set (by :mod:`dfqkit.export_onnx`), an
activation quantizer calls :func:`act_qdq` and every quantized layer's weight is
:func:`weight_dq` of its stored codes. Both are autograd functions whose ``symbolic`` emits the
ONNX nodes for PyTorch's TorchScript exporter; their ``forward`` computes the same values in
PyTorch (used only for tracing). All quantization parameters are Python numbers or buffers at
export time, so the graph holds constants only: nothing is recomputed at run time.

Activation, a grid ``s · [n_lo, n_hi]`` placed in a container by
:func:`dfqkit.quant.codes.onnx_grid` (codes ``y ∈ [low, high]``, ``n = y − zp``)::

    x → QuantizeLinear(s, zp) → [Clip(low, high)] → DequantizeLinear(s, zp)        (u)int8
    x → [Clip(s·n_lo, s·n_hi)] → QuantizeLinear(s, zp) → DequantizeLinear(s, zp)   int16

``QuantizeLinear`` computes ``saturate(round(x / s) + zp)`` and ``DequantizeLinear``
``(y − zp) · s = s · n``: Eq. 14's fake quantization with ``n = q + z``. The ``Clip`` (only
when the k-bit window is narrower than its container, e.g. ``k < 8`` in uint8) restricts the
codes to the window. On (u)int8 it clips the codes themselves, between the two nodes, where
onnxruntime still fuses ``DequantizeLinear → Conv → QuantizeLinear`` into an integer
``QLinearConv``. onnxruntime has no int16 ``Clip``, so an int16 grid clips the float before
quantizing; that is exact too, because ``round(fl(s·n_lo) / s) = n_lo`` for ``|n_lo| < 2^21``
and division and rounding are monotone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dfqkit.quant.codes import onnx_grid

#: the lowest opset whose QuantizeLinear/DequantizeLinear accept int16 (and hence used for it)
INT16_OPSET = 21


def _const(g, value: Tensor):  # noqa: ANN001, ANN202
    return g.op("Constant", value_t=value)


class _ActQDQ(torch.autograd.Function):
    """Per-tensor activation QDQ on constant parameters (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, dtype, low, high, clip):  # noqa: ANN001
        n = torch.clamp(torch.round(x.float() / scale), low - zero_point, high - zero_point)
        return n * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point, dtype, low, high, clip):  # noqa: ANN001
        if dtype == torch.int16 and g.opset < 20:  # dfqkit.export_onnx raises it to 21 after
            raise RuntimeError(f"an int16 QuantizeLinear needs opset 21, exporting at {g.opset}")
        s = _const(g, torch.tensor(scale, dtype=torch.float32))
        zp = _const(g, torch.tensor(zero_point, dtype=dtype))
        if clip and dtype == torch.int16:  # onnxruntime has no int16 Clip: clip the float
            lo = torch.tensor(scale, dtype=torch.float32) * (low - zero_point)
            hi = torch.tensor(scale, dtype=torch.float32) * (high - zero_point)
            x = g.op("Clip", x, _const(g, lo), _const(g, hi))
        q = g.op("QuantizeLinear", x, s, zp)
        if clip and dtype != torch.int16:  # on the codes, where QDQ fusion keeps the pattern
            low_c, high_c = (_const(g, torch.tensor(v, dtype=dtype)) for v in (low, high))
            q = g.op("Clip", q, low_c, high_c)
        return g.op("DequantizeLinear", q, s, zp)


def act_qdq(
    x: Tensor, scale: Tensor | float, n_lo: Tensor | int, bits: int, *, what: str
) -> Tensor:
    """The ONNX form of a per-tensor activation quantizer's grid ``scale · [n_lo, n_lo+2^k−1]``.

    Args:
        x: The activation being traced.
        scale: Step ``s`` (a 0-dim tensor or a float).
        n_lo: Lowest grid index (integer-valued).
        bits: ``k``.
        what: The quantizer's name for error messages.

    Returns:
        ``s · clamp(round(x / s), n_lo, n_hi)``, fp32; exported as the nodes above.
    """
    grid = onnx_grid(
        torch.as_tensor(scale, dtype=torch.float32).detach().reshape(()),
        torch.as_tensor(n_lo).detach().reshape(()),
        bits,
        what=what,
        weight=False,
    )
    return _ActQDQ.apply(
        x,
        grid.scale.item(),
        int(grid.zero_point),
        grid.dtype,
        int(grid.low),
        int(grid.high),
        not grid.full,
    )


class _WeightDQ(torch.autograd.Function):
    """``DequantizeLinear(codes, scale, zero_point)`` of a constant weight, per channel on dim 0
    (``axis`` 0) or per tensor (``axis`` None)."""

    @staticmethod
    def forward(ctx, codes, scale, zero_point, axis):  # noqa: ANN001
        shape = [-1] + [1] * (codes.dim() - 1) if axis is not None else []
        n = codes.double() - zero_point.double().reshape(shape)
        return (n.float() * scale.reshape(shape)).float()

    @staticmethod
    def symbolic(g, codes, scale, zero_point, axis):  # noqa: ANN001
        kwargs = {} if axis is None else {"axis_i": axis}
        return g.op("DequantizeLinear", codes, scale, zero_point, **kwargs)


def weight_dq(codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """A weight stored as integer ``codes`` with ``scale`` and ``zero_point`` of the same
    integer type: per channel along dim 0 when ``scale`` has one entry per output channel."""
    axis = 0 if scale.dim() == 1 else None
    return _WeightDQ.apply(codes, scale, zero_point, axis)
