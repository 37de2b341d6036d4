"""The loss contract: ``loss(step) -> scalar`` with a weight, a side and the taps it needs."""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import nn

from dfqkit.step import TAP_NAMES, Step

SIDES = ("generator", "student")


class Loss(nn.Module, abc.ABC):
    """Base class of every registered loss.

    Subclasses implement :meth:`compute` (the unweighted value) and declare what the trainer must
    tap for them in ``needs`` (a subset of ``{"bn_inputs", "activations", "stages",
    "attention"}``); nothing is tapped that no loss needs. ``needs_student_taps`` lists taps read
    from the student rather than the teacher.

    Args:
        weight: multiplies the loss.
        side: ``"generator"`` (summed into the generator step) or ``"student"``.
    """

    default_side: ClassVar[str] = "generator"
    needs: ClassVar[frozenset[str]] = frozenset()
    needs_student_taps: ClassVar[frozenset[str]] = frozenset()
    requires_bn: ClassVar[bool] = False
    #: a generator-side loss that reads the student's logits on the (non-detached) batch; the
    #: engine then runs the student in the generator step (its weights get no gradient there)
    needs_student: ClassVar[bool] = False

    def __init__(self, *, weight: float = 1.0, side: str | None = None) -> None:
        super().__init__()
        side = self.default_side if side is None else side
        if side not in SIDES:
            raise ValueError(f"{type(self).__name__}.side must be one of {SIDES}, got {side!r}")
        if not isinstance(weight, int | float):
            raise ValueError(f"{type(self).__name__}.weight must be a number, got {weight!r}")
        unknown = (self.needs | self.needs_student_taps) - TAP_NAMES
        if unknown:
            raise TypeError(f"{type(self).__name__} declares unknown taps {sorted(unknown)}")
        self.weight = float(weight)
        self.side = side

    @property
    def name(self) -> str:
        return type(self).__name__

    @abc.abstractmethod
    def compute(self, step: Step) -> torch.Tensor:
        """The unweighted loss (a scalar tensor)."""

    def forward(self, step: Step) -> torch.Tensor:
        return self.weight * self.compute(step)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, side={self.side!r}"
