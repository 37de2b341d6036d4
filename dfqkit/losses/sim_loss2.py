"""SimLoss_2: align the student's per-layer activation distributions with the teacher's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dfqkit.losses.base import Loss
from dfqkit.registry import register
from dfqkit.step import Step


class _ChannelMean(torch.autograd.Function):
    """``a.mean((0, 2, 3))`` whose backward returns ``grad / n`` expanded (stride 0) instead of
    a full-size tensor: the same values (each element is the one division ``g_c / n``) without
    a full-size division and allocation per layer; autograd adds it to the activation's other
    gradients as before."""

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:
        ctx.shape = a.shape
        return a.mean((0, 2, 3))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        b, c, h, w = ctx.shape
        return (grad / (b * h * w)).view(1, c, 1, 1).expand(b, c, h, w)


def channel_profile(a: torch.Tensor) -> torch.Tensor:
    """Per-channel batch mean: ``(b, c, h, w)`` → ``(c,)``; ``(b, n, d)``, ``(b, d)`` → ``(d,)``."""
    a = a.float()
    if a.dim() == 4:
        return _ChannelMean.apply(a)
    return a.reshape(-1, a.shape[-1]).mean(0)


@register("losses")
class SimLoss2(Loss):
    """Cosine distance between student and teacher per-channel activation profiles, per layer.

    For every activation layer ``j`` (the teacher's activation outputs and the student's
    quantized activations at the same places, in call order) the ``D``-vector
    ``d(A) = per-channel batch mean`` of each side is compared::

        SimLoss_2 = (1/J) Σ_j [1 - cos(d(A_Q^j), d(A_P^j))]

    on the student step's batch; gradients reach the student's weights and, through the
    quantized activations, learnable clip bounds. The comparison itself is ``O(J D)``,
    independent of the batch size, as the paper states.

    Reference: "Enhancing Diversity for Data-free Quantization" (CVPR 2025), supplement. The
    descriptor (channel means) and the layer average are dfqkit's GUESS
    (docs/methods/diversity.md).

    Args:
        weight: multiplies the loss (λ2).
        side: ``"student"`` (default).
    """

    default_side = "student"
    needs = frozenset({"activations"})
    needs_student_taps = frozenset({"activations"})

    def compute(self, step: Step) -> torch.Tensor:
        teacher = step.teacher_taps["activations"]
        student = step.student_taps["activations"]
        if len(teacher) != len(student) or not teacher:
            raise ValueError(
                f"SimLoss2 pairs activation layers one to one, but the teacher produced "
                f"{len(teacher)} and the student {len(student)} quantized activations; use the "
                "'after_relu' (CNN) or 'vit' placement, which quantize every activation output"
            )
        total = None
        for p, q in zip(teacher, student, strict=True):
            value = 1.0 - F.cosine_similarity(
                channel_profile(q), channel_profile(p.detach()), dim=0, eps=1e-8
            )
            total = value if total is None else total + value
        return total / len(teacher)
