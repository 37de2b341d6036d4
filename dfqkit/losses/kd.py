"""Knowledge distillation from teacher to student logits."""

from __future__ import annotations

import torch

from dfqkit.losses.base import Loss
from dfqkit.registry import register
from dfqkit.step import Step

REDUCTIONS = ("mean", "batchmean")


@register("losses")
class KDLoss(Loss):
    """``weight · T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` on the student side.

    ``reduction="mean"`` divides the summed KL by ``b·k`` (PyTorch ``KLDivLoss()`` default, used
    by GDFQ, Qimera, AIT, DSG); ``"batchmean"`` divides by ``b`` (IntraQ, HAST, ClusterQ). With
    ``k = 1000`` classes the two differ by 1000× in effective weight, so recipes choose it.

    Args:
        temperature: softening temperature T.
        reduction: ``"mean"`` or ``"batchmean"``.

    Reference: Hinton et al., "Distilling the Knowledge in a Neural Network", 2015; GDFQ form.
    """

    default_side = "student"

    def __init__(
        self,
        *,
        temperature: float = 20.0,
        reduction: str = "mean",
        weight: float = 1.0,
        side: str | None = None,
    ) -> None:
        super().__init__(weight=weight, side=side)
        if reduction not in REDUCTIONS:
            raise ValueError(f"KDLoss.reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not temperature > 0:
            raise ValueError(f"KDLoss.temperature must be > 0, got {temperature!r}")
        if self.side != "student":
            raise ValueError("KDLoss.side must be 'student' (it trains the student's logits)")
        self.temperature = float(temperature)
        self.reduction = reduction

    def compute(self, step: Step) -> torch.Tensor:
        t = self.temperature
        teacher_logp = (step.teacher_logits.detach().float() / t).log_softmax(-1)
        student_logp = (step.logits("student").float() / t).log_softmax(-1)
        kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum()
        denom = student_logp.numel() if self.reduction == "mean" else student_logp.shape[0]
        return kl * (t * t / denom)
