"""A floor on the entropy of the attention mixer's soft labels σ (a GUESS beyond the paper)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from dfqkit.losses.base import Loss
from dfqkit.registry import register
from dfqkit.step import Step


@register("losses")
class SigmaEntropyFloor(Loss):
    """Hinge on the entropy of each mixed sample's mixing coefficients σ (generator side).

    For a mixed sample with coefficients ``σ`` over its ``c`` classes,
    ``H(σ) = −Σ_i σ_i log σ_i`` and the uniform value is ``log c``::

        loss = mean over mixed samples of max(0, floor · log c − H(σ))

    zero while σ keeps at least ``floor`` of the uniform entropy, and pushing σ's logits apart
    from one class when it falls below. Why: the generator's soft cross entropy
    ``CE(P(x), ỹ) = H(ỹ) + KL(ỹ ‖ P(x))`` rewards a low-entropy target, and on the offline
    testbed σ collapses onto one class for every mixed sample within a few epochs
    (docs/methods/diversity.md, "Where σ comes from"); nothing in the paper's losses keeps it
    spread. Unmixed samples (one class, σ = 1) are not counted. Needs a mixer whose σ is learned
    (``MultiLayerAttentionMixer`` with ``heads > 0``): refused at start-up otherwise.

    Args:
        floor: the fraction of the uniform entropy ``log c`` kept, in ``[0, 1]``.
        weight: multiplies the loss.
        side: ``"generator"`` (default; σ trains with the generator's optimizer).
    """

    needs_learned_sigma: ClassVar[bool] = True

    def __init__(self, *, floor: float = 0.5, weight: float = 1.0, side: str | None = None):
        super().__init__(weight=weight, side=side)
        if isinstance(floor, bool) or not isinstance(floor, int | float) or not 0 <= floor <= 1:
            raise ValueError(f"SigmaEntropyFloor.floor must be a number in [0, 1], got {floor!r}")
        self.floor = float(floor)

    def compute(self, step: Step) -> torch.Tensor:
        mix = step.batch.mix
        if "sigma" not in mix:
            raise RuntimeError(
                "SigmaEntropyFloor reads the mixer's σ, but this batch has none "
                "(train.mixer must be @mixers.MultiLayerAttentionMixer() with heads > 0)"
            )
        sigma = mix["sigma"].float()  # (b, c); 0 for classes that take no part
        mixed = mix["mixed"].float()  # (b,)
        entropy = -(sigma * sigma.clamp_min(1e-12).log()).sum(1)
        gap = (self.floor * math.log(sigma.shape[1]) - entropy).clamp_min(0.0)
        return (gap * mixed).sum() / mixed.sum().clamp_min(1.0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, floor={self.floor}"
