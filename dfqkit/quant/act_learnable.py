"""Activation quantizer with learnable clip bounds (the paper's component (e), supplement §2.6).

The range ``[lo, hi]`` is first observed like GDFQ's EMA quantizer (during the calibration
epochs), then, once frozen, trained with the student: ``lo`` and ``hi`` are ``nn.Parameter``
and receive gradients from every student loss (KD, CE, SimLoss_2).

Forward: exactly the Eq. 14 fake quantization of :func:`dfqkit.quant.fake_quant` (same codes,
so export needs nothing special). Backward (LSQ / PACT-style, derived for the rounded-zero-point
grid with the rounding treated as identity), with ``s = (hi - lo) / (2^k - 1)``, ``z`` the
zero point and ``q`` the clamped code:

* ``∂/∂x = 1`` where the unrounded code ``x/s - z`` lies in ``[-2^(k-1), 2^(k-1) - 1]``
  ("inside"), 0 outside (a clipped value's gradient goes to the bound);
* ``∂out/∂s = q + z - x/s`` inside (the rounding error, LSQ), ``q + z - lo/s`` outside;
* ``∂out/∂lo = -(∂out/∂s) / (2^k - 1) + [x outside]``, ``∂out/∂hi = (∂out/∂s) / (2^k - 1)``.

So a value clipped at the top pushes ``hi`` with gradient ≈ 1 (PACT) and one clipped at the
bottom pushes ``lo``; values inside move both by their rounding error. The bound gradients are
scaled by ``1 / sqrt(N · (2^k - 1))``, ``N`` the number of features per sample (LSQ's
gradient scale), when ``grad_scale=True``.
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from dfqkit.quant.act_ema import EMAActQuantizer
from dfqkit.quant.functional import _codes, _qparams, qrange
from dfqkit.registry import register

LOWER = ("learned", "fixed_if_nonnegative")


class _LearnableFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, lo: Tensor, hi: Tensor, bits: int, grad_scale: bool) -> Tensor:
        x = x.float()
        scale, inv_scale, zero_point = _qparams(lo.float(), hi.float(), bits)
        out = _codes(x, inv_scale, zero_point, bits).add_(zero_point).mul_(scale)
        ctx.bits, ctx.grad_scale = bits, grad_scale
        ctx.save_for_backward(x, lo, scale, inv_scale, zero_point)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, lo, scale, inv_scale, zero_point = ctx.saved_tensors
        bits = ctx.bits
        qmin, qmax = qrange(bits)
        below_qmin, above_qmax = _open_bounds(bits)
        grad = grad.float()
        t = x.mul(inv_scale).sub_(zero_point)  # x / s - z: unclamped, unrounded code
        # grad where "inside" (qmin <= t <= qmax, LSQ's convention: the unrounded code), else
        # 0: hardtanh's backward passes grad on the open interval, so its bounds are the
        # float32 neighbours just outside [qmin, qmax] (one fused pass, no bool mask)
        grad_x = torch.ops.aten.hardtanh_backward(grad, t, below_qmin, above_qmax)
        total = grad.sum()
        g_out = total - grad_x.sum()  # sum of grad over the clipped values
        g_above = total - torch.ops.aten.hardtanh_backward(grad, t, -math.inf, above_qmax).sum()
        g_below = g_out - g_above
        # d out / d s: the rounding error q - t inside; q + z - lo/s for a clipped value, where
        # q is qmin (below) or qmax (above). Summed against grad:
        #   sum_inside grad (q - t) + qmin g_below + qmax g_above + (z - lo/s) g_out
        err = t.clamp(qmin, qmax).round_().sub_(t)  # q - t (0 grad weight outside: grad_x)
        g_s = torch.dot(grad_x.reshape(-1), err.reshape(-1))
        g_s = g_s + qmin * g_below + qmax * g_above + (zero_point - lo * inv_scale) * g_out
        levels = 2**bits - 1
        if ctx.grad_scale:
            per_sample = x.numel() // x.shape[0] if x.dim() > 1 else x.numel()
            factor = 1.0 / math.sqrt(per_sample * levels)
            g_s, g_out = g_s * factor, g_out * factor
        g_hi = g_s / levels
        g_lo = g_out - g_s / levels
        return grad_x, g_lo.reshape(lo.shape), g_hi.reshape(lo.shape), None, None


@functools.cache
def _open_bounds(bits: int) -> tuple[float, float]:
    """The float32 values just below ``qmin`` and just above ``qmax``: a strict comparison
    with them is the closed comparison with ``qmin`` / ``qmax`` on float32 codes."""
    qmin, qmax = qrange(bits)
    bounds = torch.tensor([qmin, qmax], dtype=torch.float32)
    out = torch.nextafter(bounds, torch.tensor([-math.inf, math.inf]))
    return float(out[0]), float(out[1])


def learnable_fake_quant(
    x: Tensor, lo: Tensor, hi: Tensor, bits: int, *, grad_scale: bool = True
) -> Tensor:
    """Eq. 14 fake quantization of ``x`` on ``[lo, hi]`` with gradients for ``lo`` and ``hi``.

    Args:
        x: input, any shape and float dtype.
        lo, hi: 0-dim range bounds (``hi > lo``).
        bits: bit width ``k``.
        grad_scale: scale the bound gradients by ``1 / sqrt(N · (2^k - 1))`` with ``N`` the
            features per sample (``numel / x.shape[0]``; LSQ).

    Returns:
        fp32 tensor shaped like ``x``, equal to ``fake_quant(x, lo, hi, bits)``.
    """
    return _LearnableFakeQuant.apply(x, lo, hi, bits, grad_scale)


@register("quantizers")
class LearnableClipActQuantizer(EMAActQuantizer):
    """Activation quantizer whose clip bounds are trained with the student (Diversity, CVPR'25).

    In ``"observe"`` mode it tracks the range exactly as :class:`EMAActQuantizer` (so the
    bounds are initialised from the observed ranges, GDFQ's calibration); in ``"frozen"`` mode
    the range is no longer observed but ``lo``/``hi`` are parameters the student optimizer
    updates. The trainer puts them in their own parameter group with learning rate ``lr``
    (absolute: the bounds live on the scale of activations, not of weights, so the same value
    serves every dataset; ``None``: the student's) and no weight decay; the rest of the
    optimizer's settings (momentum) and its schedule apply.

    Reference: "Enhancing Diversity for Data-free Quantization" (CVPR 2025), supplement
    ("learnable parameters on the clip ranges"); gradient rule after PACT (Choi et al., 2018)
    and LSQ (Esser et al., ICLR 2020). The gradient form is a GUESS (docs/methods/diversity.md).

    Args:
        bits: Bit width ``k`` in 2..16.
        momentum: EMA factor of the observation phase.
        bias_correction: GDFQ's bias-corrected EMA during observation.
        lr: learning rate of the bounds (``None``: the student's).
        grad_scale: LSQ gradient scaling of the bounds (off by default: with LSQ's scale the
            bounds need learning rates ~10^4 × the student's to move; measured, see
            docs/methods/diversity.md).
        lower: ``"learned"`` (both bounds train) or ``"fixed_if_nonnegative"``: a lower bound
            observed at 0 or above (a post-ReLU activation) keeps its observed value and only
            the upper bound trains (PACT), so zero stays exactly on the grid; a negative one
            still trains. Why: a learned lower bound of a non-negative activation creeps up
            with the rounding-error gradient until ``lo / s`` passes 0.5, zero leaves the grid
            and the bound jumps far below 0 (docs/methods/diversity.md, "Why the learned
            clips collapse"). GUESS beyond the paper, which learns both.
    """

    sync_reduce: ClassVar[str] = "mean"
    #: parameter-group overrides the trainer applies to this module's own parameters
    param_group: ClassVar[tuple[str, ...]] = ("lr", "weight_decay")

    def __init__(
        self,
        *,
        bits: int,
        momentum: float = 0.9,
        bias_correction: bool = False,
        lr: float | None = 0.01,
        grad_scale: bool = False,
        lower: str = "learned",
    ) -> None:
        super().__init__(
            bits=bits, momentum=momentum, bias_correction=bias_correction, ste="clipped"
        )
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float) or lr <= 0):
            raise ValueError(f"lr must be None or a positive number, got {lr!r}")
        del self._buffers["lo"], self._buffers["hi"]
        self.lo = nn.Parameter(torch.zeros(()))
        self.hi = nn.Parameter(torch.zeros(()))
        self.lr = None if lr is None else float(lr)
        self.weight_decay = 0.0
        self.grad_scale = bool(grad_scale)
        if lower not in LOWER:
            raise ValueError(
                f"LearnableClipActQuantizer.lower must be one of {LOWER}, got {lower!r}"
            )
        self.lower = lower

    def _quantize(self, x: Tensor) -> Tensor:
        if self.mode == "observe":  # observer ranges: plain Eq. 14
            return super()._quantize(x)
        lo = self.lo
        if self.lower == "fixed_if_nonnegative":
            # the same value; a gradient only where the bound is negative (no host sync)
            held = lo.detach()
            lo = torch.where(held < 0, lo, held)
        return learnable_fake_quant(x, lo, self.hi, self.bits, grad_scale=self.grad_scale)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, lr={self.lr}, grad_scale={self.grad_scale}, "
            f"lower={self.lower!r}"
        )
