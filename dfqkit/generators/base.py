"""The generator contract and the one function that turns (generator, mixer) into a batch."""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dfqkit.step import SynthBatch


class Generator(nn.Module, abc.ABC):
    """Base class of image synthesizers.

    A generator samples labels and latents (:meth:`sample`), maps them to a conditioning vector
    (:meth:`embed`) and decodes that to images in the teacher's normalized input space
    (:meth:`decode`). Mixers act between embedding and decoding (``stage = "cond"``) or on the
    decoded images (``stage = "image"``); ``accepts_stages`` lists which a generator supports.

    Attributes:
        num_classes: classes the labels are drawn from.
        trainable: whether the trainer runs a generator step (a fixed image source is not).
    """

    accepts_stages: ClassVar[frozenset[str]] = frozenset({"cond", "image"})
    trainable: ClassVar[bool] = True

    def __init__(self, *, num_classes: int, latent_dim: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        self.num_classes = num_classes
        self.latent_dim = latent_dim

    def sample(self, batch_size: int, device: torch.device) -> SynthBatch:
        """Uniform labels, Gaussian latents, one-hot targets (on ``device``, global RNG)."""
        labels = torch.randint(0, self.num_classes, (batch_size,), device=device)
        z = torch.randn(batch_size, self.latent_dim, device=device)
        targets = F.one_hot(labels, self.num_classes).float()
        return SynthBatch(labels=labels, z=z, targets=targets)

    @abc.abstractmethod
    def embed(self, labels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``(b,), (b, latent_dim) -> (b, d)`` conditioning for :meth:`decode`."""

    @abc.abstractmethod
    def decode(self, batch: SynthBatch) -> torch.Tensor:
        """``batch.cond (b, d) -> (b, c, h, w)`` images."""

    def forward(self, batch: SynthBatch) -> torch.Tensor:
        return self.decode(batch)


def synthesize(
    generator: nn.Module,
    mixer: nn.Module,
    batch_size: int,
    device: torch.device,
    *,
    mix: bool = True,
) -> SynthBatch:
    """One synthesized (and mixed) batch: sample → [cond mixer | embed] → decode → [image mixer].

    ``generator`` may be wrapped (DDP); its methods are reached through ``.module`` then.
    ``mix=False``: the batch the mixer passes on when it mixes no sample (an image mixer is
    skipped, a cond mixer gives its :meth:`~dfqkit.mixers.base.Mixer.unmixed` conditioning),
    what ``train.calibration = 'generator_unmixed'`` observes ranges on.
    """
    gen = getattr(generator, "module", generator)
    module = getattr(mixer, "module", mixer)
    stage = module.stage
    batch = gen.sample(batch_size, device)
    if not gen.trainable:
        return mixer(batch, gen) if stage == "image" and mix else batch
    if stage == "cond":
        batch = mixer(batch, gen) if mix else module.unmixed(batch, gen)
    else:
        batch = batch.replace(cond=gen.embed(batch.labels, batch.z))
    batch = batch.replace(images=generator(batch))
    if stage == "image" and mix:
        batch = mixer(batch, gen)
    return batch
