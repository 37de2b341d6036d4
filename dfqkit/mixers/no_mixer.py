"""The identity mixer."""

from __future__ import annotations

from torch import nn

from dfqkit.mixers.base import Mixer
from dfqkit.registry import register
from dfqkit.step import SynthBatch


@register("mixers")
class NoMixer(Mixer):
    """Leaves the batch unchanged (GDFQ: no mixing)."""

    stage = "image"

    def forward(self, batch: SynthBatch, generator: nn.Module) -> SynthBatch:
        return batch
