"""Activation quantizer whose range is an exponential moving average of batch min/max."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from dfqkit.quant.act_base import ActQuantizer
from dfqkit.registry import register


@register("quantizers")
class EMAActQuantizer(ActQuantizer):
    """Per-tensor activation quantizer with an EMA of the batch min/max (GDFQ family).

    ``bias_correction=False``: a plain EMA, ``lo = m * lo + (1 - m) * batch_lo``, initialised
    with the first batch's min/max.

    ``bias_correction=True`` reproduces GDFQ's ``QuantAct`` exactly, bug included: buffers start
    at 0 and every update divides the *stored* value by ``1 - m^t`` (``t`` = updates so far,
    this one included), ``lo = (m * lo + (1 - m) * batch_lo) / (1 - m^t)``. With a constant batch
    statistic of 1.0 and ``m = 0.9`` this gives 1.0, 5.3, 17.8, 47 at t = 1..4, peaks near
    3,900 at t ~ 21 and settles to the plain EMA only after ~150 updates (docs/quantization.md): use
    it knowingly, to match baselines that calibrate for ~800 updates.

    Reference: GDFQ (Xu et al., ECCV 2020), ``QuantAct`` with ``beta = 0.9``.

    Args:
        bits: Bit width ``k`` in 2..16.
        momentum: EMA factor ``m`` in [0, 1) (weight of the stored value).
        bias_correction: Apply GDFQ's (buggy) bias correction.
        ste: Straight-through estimator, ``"identity"`` (GDFQ) or ``"clipped"``.
    """

    sync_reduce: ClassVar[str] = "mean"

    def __init__(
        self,
        *,
        bits: int,
        momentum: float = 0.9,
        bias_correction: bool = False,
        ste: str = "identity",
    ) -> None:
        super().__init__(bits=bits, ste=ste)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
            raise ValueError(f"momentum must be a float in [0, 1), got {momentum!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.bias_correction = bool(bias_correction)

    def _update(self, batch_lo: Tensor, batch_hi: Tensor) -> None:
        m = self.momentum
        if self.bias_correction:
            correction = 1.0 - m ** (self._updates + 1)
            self.lo.mul_(m).add_(batch_lo, alpha=1.0 - m).div_(correction)
            self.hi.mul_(m).add_(batch_hi, alpha=1.0 - m).div_(correction)
        elif self._updates == 0:
            self.lo.copy_(batch_lo)
            self.hi.copy_(batch_hi)
        else:
            self.lo.mul_(m).add_(batch_lo, alpha=1.0 - m)
            self.hi.mul_(m).add_(batch_hi, alpha=1.0 - m)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, momentum={self.momentum}, "
            f"bias_correction={self.bias_correction}"
        )
