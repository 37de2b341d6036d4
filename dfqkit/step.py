"""The data passed between parts: what generators and mixers produce, what losses read."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

TAP_NAMES = frozenset({"bn_inputs", "activations", "stages", "attention", "block_attention"})


@dataclass
class SynthBatch:
    """A batch on its way from the generator (and mixer) to the models.

    Attributes:
        labels: ``(b,)`` hard labels (the dominant class of a mixed sample).
        z: ``(b, latent_dim)`` latent noise, or ``None`` for generators without one.
        targets: ``(b, k)`` soft labels summing to 1 (one-hot when unmixed); ``None`` when the
            target is the teacher's own prediction (image-only mixup).
        cond: ``(b, d)`` conditioning fed to the generator's decoder.
        images: ``(b, c, h, w)`` synthesized images in the teacher's normalized input space.
        mix: mixing information recorded by a mixer (indices, coefficients), for logging.
    """

    labels: torch.Tensor
    z: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    cond: torch.Tensor | None = None
    images: torch.Tensor | None = None
    mix: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> SynthBatch:
        return replace(self, **changes)

    def detached(self) -> SynthBatch:
        """The same batch with every tensor detached (what the student step sees)."""

        def det(x: Any) -> Any:
            return x.detach() if isinstance(x, torch.Tensor) else x

        return SynthBatch(
            labels=self.labels,
            z=det(self.z),
            targets=det(self.targets),
            cond=det(self.cond),
            images=det(self.images),
            mix={k: det(v) for k, v in self.mix.items()},
        )


@dataclass
class Step:
    """What a loss reads.

    Attributes:
        batch: the synthesized (possibly mixed) batch.
        teacher_logits: ``(b, k)`` teacher logits on ``batch.images``.
        student_logits: ``(b, k)`` student logits, ``None`` in a generator step that does not
            run the student.
        teacher_taps: tensors tapped from the teacher, by tap name (``"bn_inputs"`` maps to a
            list of ``(input, bn_module)`` pairs); only taps some loss declared.
        student_taps: the same for the student.
        epoch: the current epoch (for schedules inside losses).
    """

    batch: SynthBatch
    teacher_logits: torch.Tensor
    student_logits: torch.Tensor | None = None
    teacher_taps: dict[str, Any] = field(default_factory=dict)
    student_taps: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0

    def logits(self, side: str) -> torch.Tensor:
        """The logits a loss on ``side`` trains: the teacher's (generator side) or the student's."""
        if side == "generator":
            return self.teacher_logits
        if self.student_logits is None:
            raise RuntimeError("student logits are not available in this step")
        return self.student_logits
