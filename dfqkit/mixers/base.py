"""The mixer contract."""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import nn

from dfqkit.step import Step, SynthBatch

STAGES = ("cond", "image")


class Mixer(nn.Module, abc.ABC):
    """Base class of mixers: ``mixer(batch, generator) -> batch``.

    ``stage = "cond"`` mixers act before decoding and must set ``batch.cond`` (and the soft
    ``targets``) using the generator's embedding; ``stage = "image"`` mixers act on
    ``batch.images``. One ``train.mixer`` slot takes either kind.

    A mixer with learned parts that depend on the teacher builds them in :meth:`bind` (called
    once by the trainer before the optimizers exist), may declare teacher taps in ``needs``
    (``stage_parts`` gives ``J`` for the ``"stages"`` tap) and may add its own term to the
    generator step through :meth:`aux_loss`.
    """

    stage: ClassVar[str] = "image"
    needs: frozenset[str] = frozenset()
    stage_parts: int | None = None

    def bind(self, *, teacher: nn.Module, generator: nn.Module, example: torch.Tensor) -> None:
        """Build teacher-dependent parts (default: nothing)."""

    def aux_loss(self, step: Step) -> torch.Tensor | None:
        """An extra generator-step loss (already weighted), or ``None`` (default)."""
        return None

    @abc.abstractmethod
    def forward(self, batch: SynthBatch, generator: nn.Module) -> SynthBatch:
        """Return the mixed batch."""

    def unmixed(self, batch: SynthBatch, generator: nn.Module) -> SynthBatch:
        """The batch this mixer passes on when it mixes no sample: what ranges are observed on
        with ``train.calibration = 'generator_unmixed'``. An image mixer is simply skipped
        (:func:`~dfqkit.generators.base.synthesize` with ``mix=False``), so only a
        ``stage = "cond"`` mixer is asked, and it must set ``batch.cond``."""
        raise NotImplementedError(
            f"{type(self).__name__} (stage {self.stage!r}) has no unmixed form, so "
            "train.calibration = 'generator_unmixed' cannot be used with it"
        )
