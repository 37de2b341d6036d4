"""Cross entropy against the batch's soft targets."""

from __future__ import annotations

import torch

from dfqkit.losses.base import Loss
from dfqkit.registry import register
from dfqkit.step import Step


@register("losses")
class SoftTargetCE(Loss):
    """Cross entropy of the side's logits against the batch's (soft) targets.

    ``-Σ_k t_k log softmax(logits)_k`` averaged over the batch; with one-hot targets this is
    ordinary CE to the conditioning labels (GDFQ's ``CE(F(x), y)`` on the generator side and
    ``CE(Q(x), y)`` on the student side). When the batch carries no targets (image-only mixup)
    the teacher's own prediction is the target.

    Reference: Xu et al., "Generative Low-bitwidth Data Free Quantization", ECCV 2020 (GDFQ);
    soft targets as in Qimera (NeurIPS 2021).
    """

    def compute(self, step: Step) -> torch.Tensor:
        logits = step.logits(self.side).float()
        targets = step.batch.targets
        if targets is None:
            targets = step.teacher_logits.detach().float().softmax(-1)
        return -(targets * logits.log_softmax(-1)).sum(-1).mean()
