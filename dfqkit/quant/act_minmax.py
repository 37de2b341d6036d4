"""Activation quantizer whose range is the running global min/max of every batch seen."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from dfqkit.quant.act_base import ActQuantizer
from dfqkit.registry import register


@register("quantizers")
class MinMaxActQuantizer(ActQuantizer):
    """Per-tensor activation quantizer with the global running min/max (ZeroQ, PSAQ-ViT).

    ``lo = min(lo, batch_lo)``, ``hi = max(hi, batch_hi)`` with both buffers starting at 0, so
    the range always contains 0 (an all-positive tensor gets ``lo = 0``).

    Reference: ZeroQ (Cai et al., CVPR 2020) and PSAQ-ViT (Li et al., ECCV 2022), ``QuantAct``.

    Args:
        bits: Bit width ``k`` in 2..16.
        ste: Straight-through estimator, ``"identity"`` or ``"clipped"``.
    """

    sync_reduce: ClassVar[str] = "minmax"

    def _update(self, batch_lo: Tensor, batch_hi: Tensor) -> None:
        torch.minimum(self.lo, batch_lo, out=self.lo)
        torch.maximum(self.hi, batch_hi, out=self.hi)
