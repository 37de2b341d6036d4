"""Mixers: act on the conditioning (``stage = "cond"``) or on the images (``stage = "image"``)."""

from dfqkit.mixers.base import STAGES, Mixer
from dfqkit.mixers.no_mixer import NoMixer

__all__ = ["STAGES", "Mixer", "NoMixer"]
