"""PSAQ-ViT's total-variation prior on synthesized images."""

from __future__ import annotations

import torch

from dfqkit.losses.base import Loss
from dfqkit.registry import register
from dfqkit.step import Step


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Per-image anisotropic total variation ``Σ |x[h+1]-x[h]| + |x[w+1]-x[w]|``, ``(b,)``."""
    dh = (images[:, :, 1:, :] - images[:, :, :-1, :]).abs().flatten(1).sum(1)
    dw = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs().flatten(1).sum(1)
    return dh + dw


@register("losses")
class TVPrior(Loss):
    """``| TV(x) − v |`` averaged over the batch, with ``v ~ U(low, high)`` drawn every step.

    Keeps synthesized images at a natural level of smoothness instead of driving the total
    variation to zero. PSAQ-ViT draws ``v`` from ``U(2500, 3000)`` for 3×224×224 images with
    weight 0.05; for other shapes the range is scaled by the number of pixel differences
    (``scale_to_image=True``), so the prior asks the same smoothness per pixel.

    Reference: PSAQ-ViT (Li et al., ECCV 2022) and its official code. The per-image TV and the
    scaling rule are dfqkit's reading (docs/methods/psaq_vit.md).

    Args:
        low, high: the target range for a 3×224×224 image.
        scale_to_image: scale the range to the batch's image shape.
        weight: multiplies the loss (PSAQ-ViT uses 0.05; set it in the recipe).
        side: ``"generator"`` (default).
    """

    REFERENCE_DIFFS = 3 * 2 * 224 * 223  # horizontal + vertical differences of 3×224×224

    def __init__(
        self,
        *,
        low: float = 2500.0,
        high: float = 3000.0,
        scale_to_image: bool = True,
        weight: float = 1.0,
        side: str | None = None,
    ) -> None:
        super().__init__(weight=weight, side=side)
        if not 0 <= low <= high:
            raise ValueError(f"TVPrior needs 0 <= low <= high, got low={low}, high={high}")
        self.low, self.high, self.scale_to_image = float(low), float(high), bool(scale_to_image)

    def compute(self, step: Step) -> torch.Tensor:
        x = step.batch.images.float()
        c, h, w = x.shape[1:]
        factor = (
            c * (h * (w - 1) + w * (h - 1)) / self.REFERENCE_DIFFS if self.scale_to_image else 1.0
        )
        target = torch.empty((), device=x.device).uniform_(self.low, self.high) * factor
        return (total_variation(x) - target).abs().mean()
