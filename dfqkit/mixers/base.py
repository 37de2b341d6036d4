"""The mixer contract."""

from __future__ import annotations

import abc
from typing import ClassVar

from torch import nn

from dfqkit.step import SynthBatch

STAGES = ("cond", "image")


class Mixer(nn.Module, abc.ABC):
    """Base class of mixers: ``mixer(batch, generator) -> batch``.

    ``stage = "cond"`` mixers act before decoding and must set ``batch.cond`` (and the soft
    ``targets``) using the generator's embedding; ``stage = "image"`` mixers act on
    ``batch.images``. One ``train.mixer`` slot takes either kind.
    """

    stage: ClassVar[str] = "image"

    @abc.abstractmethod
    def forward(self, batch: SynthBatch, generator: nn.Module) -> SynthBatch:
        """Return the mixed batch."""
