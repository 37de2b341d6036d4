"""Nearest ×2 upsampling followed by a 3×3 convolution, computed without the upsampled tensor.

``conv3x3(upsample2x(x))`` gives each output pixel of phase ``(a, b)`` (row/column parity) a sum
over only a 2×2 neighbourhood of ``x``, with taps that are sums of the 3×3 kernel's rows and
columns. One 2×2 convolution over ``x`` with the four phases' kernels stacked as output
channels, followed by interleaving the phases, computes the same function with 16/36 of the
multiply-adds and never materializes the 4× larger upsampled input. The parameters are those of
the 3×3 convolution, so checkpoints are interchangeable with the plain form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# _PHASE[a] maps the 3 kernel rows (offsets -1, 0, +1 in the upsampled image) to the 2 taps of
# phase a over the padded low-resolution input: phase 0 reads rows (i-1, i), phase 1 (i, i+1).
_PHASE = torch.tensor(
    [[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]
)  # (a, tap, kernel row)


class UpsampleConv2d(nn.Conv2d):
    """``Conv2d(k=3, padding=1)`` applied to ``Upsample(scale_factor=2, mode="nearest")(x)``.

    Shapes: ``(b, c_in, h, w) -> (b, c_out, 2h, 2w)``.
    """

    def __init__(self, in_channels: int, out_channels: int, *, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, padding=1, bias=bias)

    def phase_kernels(self) -> torch.Tensor:
        """``(4·c_out, c_in, 2, 2)`` kernels, ordered (row phase, column phase, out channel)."""
        phase = _PHASE.to(self.weight)
        k = torch.einsum("aru,oiuv,bsv->aboirs", phase, self.weight, phase)
        return k.reshape(4 * self.out_channels, self.in_channels, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        o = self.out_channels
        bias = self.bias.repeat(4) if self.bias is not None else None
        y = F.conv2d(x, self.phase_kernels().to(x.dtype), bias, padding=1)  # (n, 4o, h+1, w+1)
        channels_last = not y.is_contiguous() and y.is_contiguous(memory_format=_CL)
        return _InterleavePhases.apply(y.view(n, 2, 2, o, h + 1, w + 1), channels_last)


_CL = torch.channels_last


def _new(like: torch.Tensor, shape: tuple[int, int, int, int], channels_last: bool, zero: bool):
    """A fresh ``(n, c, h, w)`` tensor, NCHW or channels_last (the memory format of the
    convolution around it, so elementwise ops next to it see one layout)."""
    fmt = _CL if channels_last else torch.contiguous_format
    out = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)
    return out.zero_() if zero else out


class _InterleavePhases(torch.autograd.Function):
    """``(n, 2, 2, o, h+1, w+1) -> (n, o, 2h, 2w)``: phase (a, b) is the window starting at (a, b).

    Written as a Function because autograd's backward of four overlapping slices allocates and
    zero-fills four full-size gradients; this one allocates one.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        n, _, _, o, h1, w1 = y.shape
        h, w = h1 - 1, w1 - 1
        ctx.channels_last = channels_last
        full = _new(y, (n, o, 2 * h, 2 * w), channels_last, zero=False)
        out = full.view(n, o, h, 2, w, 2)
        for a in (0, 1):
            for b in (0, 1):
                out[:, :, :, a, :, b] = y[:, a, b, :, a : a + h, b : b + w]
        return full

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        n, o, h2, w2 = grad.shape
        h, w = h2 // 2, w2 // 2
        g = grad.reshape(n, o, h, 2, w, 2)
        gy = _new(grad, (n, 4 * o, h + 1, w + 1), ctx.channels_last, zero=True)
        gy = gy.view(n, 2, 2, o, h + 1, w + 1)
        for a in (0, 1):
            for b in (0, 1):
                gy[:, a, b, :, a : a + h, b : b + w] = g[:, :, :, a, :, b]
        return gy, None
