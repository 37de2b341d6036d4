"""Symmetric per-channel weight quantizer (PSAQ-ViT)."""

from __future__ import annotations

from torch import Tensor, nn

from dfqkit.quant.functional import check_bits, check_ste, qrange
from dfqkit.registry import register


@register("quantizers")
class SymmetricWeightQuantizer(nn.Module):
    """Symmetric weight fake quantization with zero point 0, per output channel or per tensor.

    ``s = max(|w|) / ((2^k - 1) / 2)``, ``q = clamp(round(w / s), -2^(k-1), 2^(k-1) - 1)``,
    ``ŵ = s · q``, recomputed from the current weight at every forward (no state).

    Reference: PSAQ-ViT (Li et al., ECCV 2022), ``QuantLinear`` / ``QuantConv2d`` weights
    in its official code (docs/methods/psaq_vit.md).

    Args:
        bits: Bit width ``k`` in 2..16.
        per_channel: One scale per output channel (dim 0) or one for the whole tensor.
        ste: ``"identity"`` (the gradient passes unchanged) or ``"clipped"`` (zero where the
            code was clamped).
    """

    def __init__(self, *, bits: int, per_channel: bool = True, ste: str = "identity") -> None:
        super().__init__()
        check_bits(bits)
        check_ste(ste)
        self.bits = bits
        self.per_channel = bool(per_channel)
        self.ste = ste

    def scale(self, w: Tensor) -> Tensor:
        """``(c_out, 1, ..., 1)`` per channel or ``()`` per tensor, fp32."""
        w = w.detach().float()
        if self.per_channel and w.dim() > 1:
            m = w.abs().reshape(w.shape[0], -1).amax(dim=1)
            m = m.view((w.shape[0],) + (1,) * (w.dim() - 1))
        else:
            m = w.abs().amax()
        return m.clamp_min(1e-8) / ((2**self.bits - 1) / 2)

    def codes(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``(q, scale)`` with ``q`` integer-valued fp32, ``w ≈ scale · q``."""
        qmin, qmax = qrange(self.bits)
        s = self.scale(w)
        return (w.detach().float() / s).round_().clamp_(qmin, qmax), s

    def forward(self, w: Tensor) -> Tensor:
        """Fake-quantized weight, fp32, shape of ``w``."""
        q, s = self.codes(w)
        out = q * s
        w32 = w.float()
        if self.ste == "clipped":
            inside = (w32 / s).abs() <= 2 ** (self.bits - 1)
            return (w32 * inside) + (out - w32 * inside).detach()
        return w32 + (out - w32).detach()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}, ste={self.ste!r}"
