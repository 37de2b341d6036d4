"""SimLoss_1: spread the teacher's features on a synthesized batch away from one sharp mode."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dfqkit.losses.base import Loss
from dfqkit.registry import register
from dfqkit.step import Step


@register("losses")
class SimLoss1(Loss):
    """Mean cosine similarity of each sample's teacher features to the batch centroid.

    For the pooled teacher features ``a_i`` (``(n, D_f)``) at the end of each of ``parts`` even
    parts of the teacher (``parts = 1``: the penultimate features, the input of the classifier)
    and their batch centroid ``ā = mean_i a_i``::

        SimLoss_1 = mean over parts of (1/n) Σ_i cos(a_i, ā)

    Minimising it (generator side; the teacher is frozen, gradients reach the generator and the
    mixer) moves the samples of a batch away from their common mode, so the teacher's
    activation values stop concentrating in one sharp peak. Cost ``O(n D_f)``: no ``n × n``
    similarity matrix, as the paper states.

    Reference: "Enhancing Diversity for Data-free Quantization" (CVPR 2025), supplement. The
    exact formula is not published; this centroid form is dfqkit's GUESS
    (docs/methods/diversity.md).

    Args:
        parts: number of even parts whose end features are used (1 = penultimate only).
        weight: multiplies the loss (λ1).
        side: ``"generator"`` (default).
    """

    needs = frozenset({"stages"})

    def __init__(self, *, parts: int = 1, weight: float = 1.0, side: str | None = None) -> None:
        super().__init__(weight=weight, side=side)
        if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
            raise ValueError(f"SimLoss1.parts must be an integer >= 1, got {parts!r}")
        self.stage_parts = parts

    def compute(self, step: Step) -> torch.Tensor:
        feats = step.teacher_taps["stages"][self.stage_parts]
        total = None
        for a in feats:
            a = a.float().flatten(1)  # (n, D_f)
            centroid = a.mean(0, keepdim=True)  # (1, D_f)
            value = F.cosine_similarity(a, centroid, dim=1, eps=1e-8).mean()
            total = value if total is None else total + value
        return total / len(feats)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, parts={self.stage_parts}"
