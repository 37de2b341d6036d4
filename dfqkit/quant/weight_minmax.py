"""Min/max weight quantizer recomputed from the current weight at every forward (GDFQ)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dfqkit.quant.functional import (
    check_bits,
    check_ste,
    fake_quant,
    minmax_qparams,
    quantize_codes,
)
from dfqkit.registry import register


@register("quantizers")
class MinMaxWeightQuantizer(nn.Module):
    """Asymmetric min/max weight fake quantization, per output channel or per tensor.

    The range is the min/max of the weight as it is now (no state, nothing learned), so it
    follows the weight during fine-tuning. Per channel means along dim 0: conv weights
    ``(c_out, c_in, kh, kw)`` get one range per output channel, linear weights ``(out, in)`` one
    per row.

    Reference: GDFQ (Xu et al., ECCV 2020), ``Quant_Conv2d`` / ``Quant_Linear`` weights.

    Args:
        bits: Bit width ``k`` in 2..16.
        per_channel: One range per output channel (True) or one for the whole tensor.
        ste: Straight-through estimator, ``"identity"`` (GDFQ) or ``"clipped"``.
    """

    def __init__(self, *, bits: int, per_channel: bool = True, ste: str = "identity") -> None:
        super().__init__()
        check_bits(bits)
        check_ste(ste)
        self.bits = bits
        self.per_channel = bool(per_channel)
        self.ste = ste

    def _range(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Min/max of ``w``: shapes ``(c, 1, ..., 1)`` per channel, ``()`` per tensor."""
        w = w.detach()
        if self.per_channel and w.dim() > 1:
            lo, hi = torch.aminmax(w.reshape(w.shape[0], -1), dim=1)
            shape = (w.shape[0],) + (1,) * (w.dim() - 1)
            return lo.view(shape), hi.view(shape)
        return torch.aminmax(w)

    def forward(self, w: Tensor) -> Tensor:
        """Fake-quantize a weight.

        Args:
            w: Weight ``(c_out, ...)``.

        Returns:
            fp32 fake-quantized weight, shape of ``w``.
        """
        lo, hi = self._range(w)
        return fake_quant(w, lo, hi, self.bits, self.ste)

    def codes(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Integer codes and quantization parameters of a weight (for tests and export).

        Args:
            w: Weight ``(c_out, ...)``.

        Returns:
            ``(q, scale, zero_point)``: ``q`` shaped like ``w`` (fp32 holding integers in
            ``-2^(k-1)..2^(k-1)-1``); ``scale`` and ``zero_point`` ``(c_out, 1, ..., 1)`` per
            channel or ``()`` per tensor, with ``w ~= scale * (q + zero_point)``.
        """
        lo, hi = self._range(w)
        scale, zero_point = minmax_qparams(lo, hi, self.bits)
        return quantize_codes(w.detach(), scale, zero_point, self.bits), scale, zero_point

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}, ste={self.ste!r}"
