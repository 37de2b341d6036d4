"""AdaSG / AdaDFQ: the zero-sum game between generator and quantized model."""

from __future__ import annotations

import math

import torch

from dfqkit.losses.base import Loss
from dfqkit.registry import register
from dfqkit.step import Step


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of ``softmax(logits)``: ``(b, k) -> (b,)``."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


@register("losses")
class AdaptiveMarginLoss(Loss):
    """AdaSG/AdaDFQ's generator loss on the teacher–student logit difference.

    With ``F`` the teacher's and ``Q`` the student's logits on the batch (the student runs in
    the generator step, its weights frozen there), ``H`` the entropy of ``softmax(F − Q)`` per
    sample and ``H' = (H − min_b H) / (log C − min_b H)`` its batch-normalised value::

        L = mean(max(λ_l − H', 0)) + mean(max(H' − λ_u, 0))
            + β · [α_ds · CE(F − Q, y) + α_as · CE(F + Q, y)]

    The margin keeps the samples' disagreement between the bounds ``λ_l`` and ``λ_u``; the CE on
    ``F − Q`` favours samples the two models disagree on, the CE on ``F + Q`` samples they
    agree on (``y``: the batch's targets). Any batch size (the released code hard-codes 16).
    The BNS term of the paper is the separate :class:`BNStatsLoss` (weight ``γ = 1``).

    Reference: Qian et al., "Adaptive Data-Free Quantization" (AdaDFQ, CVPR 2023) and
    "Rethinking Data-Free Quantization as a Zero-Sum Game" (AdaSG, AAAI 2023), and their
    official code (docs/methods.md).

    Args:
        lambda_l, lambda_u: the margin bounds (AdaSG 0.3 / 0.8; AdaDFQ CIFAR 0.1 / 0.8).
        alpha_ds, alpha_as: disagreement / agreement CE weights (AdaSG 0.1 / 0.1; AdaDFQ 0.2 /
            0.1).
        beta: weight of the two CE terms.
        detach_min: stop the gradient through ``min_b H`` in ``H'`` (``False``: the released
            code, where the gradient also flows through the batch minimum; ``True``: dfqkit
            before 0.2).
        weight: multiplies the loss.
    """

    needs_student = True

    def __init__(
        self,
        *,
        lambda_l: float = 0.3,
        lambda_u: float = 0.8,
        alpha_ds: float = 0.1,
        alpha_as: float = 0.1,
        beta: float = 1.0,
        detach_min: bool = False,
        weight: float = 1.0,
        side: str | None = None,
    ) -> None:
        super().__init__(weight=weight, side=side)
        if not isinstance(detach_min, bool):
            raise ValueError(
                f"AdaptiveMarginLoss.detach_min must be True or False, got {detach_min!r}"
            )
        self.detach_min = detach_min
        if not 0.0 <= lambda_l <= lambda_u <= 1.0:
            raise ValueError(
                f"AdaptiveMarginLoss needs 0 <= lambda_l <= lambda_u <= 1, got "
                f"lambda_l={lambda_l}, lambda_u={lambda_u}"
            )
        if self.side != "generator":
            raise ValueError("AdaptiveMarginLoss.side must be 'generator'")
        self.lambda_l, self.lambda_u = float(lambda_l), float(lambda_u)
        self.alpha_ds, self.alpha_as, self.beta = float(alpha_ds), float(alpha_as), float(beta)

    def compute(self, step: Step) -> torch.Tensor:
        if step.student_logits is None:
            raise RuntimeError(
                "AdaptiveMarginLoss needs the student's logits in the generator step"
            )
        f, q = step.teacher_logits.float(), step.student_logits.float()
        diff = f - q
        h = _entropy(diff)
        h_min = h.min().detach() if self.detach_min else h.min()
        h_norm = (h - h_min) / (math.log(diff.shape[1]) - h_min).clamp_min(1e-8)
        margin = (self.lambda_l - h_norm).relu().mean() + (h_norm - self.lambda_u).relu().mean()
        targets = step.batch.targets
        if targets is None:
            targets = torch.nn.functional.one_hot(step.batch.labels, diff.shape[1]).float()
        ce_ds = -(targets * diff.log_softmax(-1)).sum(-1).mean()
        ce_as = -(targets * (f + q).log_softmax(-1)).sum(-1).mean()
        return margin + self.beta * (self.alpha_ds * ce_ds + self.alpha_as * ce_as)


@register("losses")
class DifferenceEntropyLoss(Loss):
    """AdaSG/AdaDFQ's student loss: maximise the entropy of the teacher–student difference.

    ``L_Q = −T² · mean_i H(softmax((F(x) − Q(x)) / T))``: the difference of the logits is
    pushed towards a constant, i.e. ``Q ≈ F`` up to a per-sample shift. No CE and no KL.

    Reference: AdaSG (AAAI 2023) / AdaDFQ (CVPR 2023) and their official code.

    Args:
        temperature: T (20 CIFAR, 5 ImageNet in the released configs).
        weight: multiplies the loss.
    """

    default_side = "student"

    def __init__(
        self, *, temperature: float = 20.0, weight: float = 1.0, side: str | None = None
    ) -> None:
        super().__init__(weight=weight, side=side)
        if not temperature > 0:
            raise ValueError(f"DifferenceEntropyLoss.temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def compute(self, step: Step) -> torch.Tensor:
        t = self.temperature
        diff = (step.teacher_logits.detach().float() - step.logits("student").float()) / t
        return -(t * t) * _entropy(diff).mean()
