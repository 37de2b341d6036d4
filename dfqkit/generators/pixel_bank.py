"""A bank of learnable images (PSAQ-ViT's data synthesis): the pixels are the parameters."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfqkit.generators.base import Generator
from dfqkit.registry import register
from dfqkit.step import SynthBatch


@register("generators")
class PixelBank(Generator):
    """``num_images`` images optimised directly, each with a fixed random pseudo label.

    Every step returns the whole bank (so ``batch_size`` must equal ``num_images``), randomly
    rolled by up to ``jitter`` pixels and flipped left-right with probability ½ (one draw for
    the batch, as PSAQ-ViT does); after each generator step the pixels are clipped to the
    valid range of the normalized input space (``[(0 - mean) / std, (1 - mean) / std]`` per
    channel), through :meth:`after_step`.

    Reference: PSAQ-ViT (Li et al., ECCV 2022): one batch of 32 images from N(0, 1), Adam
    (lr 0.2 DeiT / 0.25 Swin, betas (0.5, 0.9)), cosine schedule, random roll and flip
    (its official code; docs/methods/psaq_vit.md).

    Args:
        data: the :class:`~dfqkit.data.EvalData` whose image shape, classes and normalization
            the bank follows (its images are never read).
        num_images: bank size (PSAQ-ViT: 32).
        jitter: maximum roll in pixels (PSAQ-ViT: 15 then 30 at 224 px).
        flip: random horizontal flips.
        seed: seed of the initial pixels and pseudo labels.
    """

    accepts_stages = frozenset({"image"})

    def __init__(
        self, *, data, num_images: int = 32, jitter: int = 0, flip: bool = True, seed: int = 0
    ) -> None:
        super().__init__(num_classes=data.num_classes, latent_dim=1)
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"PixelBank.num_images must be an integer >= 1, got {num_images!r}")
        if isinstance(jitter, bool) or not isinstance(jitter, int) or jitter < 0:
            raise ValueError(f"PixelBank.jitter must be an integer >= 0, got {jitter!r}")
        self.image_size, self.channels = data.image_size, data.channels
        self.num_images, self.jitter, self.flip = num_images, jitter, bool(flip)
        gen = torch.Generator().manual_seed(seed)
        shape = (num_images, data.channels, data.image_size, data.image_size)
        self.pixels = nn.Parameter(torch.randn(shape, generator=gen))
        self.register_buffer(
            "labels", torch.randint(data.num_classes, (num_images,), generator=gen)
        )
        mean = torch.as_tensor(data.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.as_tensor(data.std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("low", (0 - mean) / std, persistent=False)
        self.register_buffer("high", (1 - mean) / std, persistent=False)

    def sample(self, batch_size: int, device: torch.device) -> SynthBatch:
        if batch_size != self.num_images:
            raise ValueError(
                f"PixelBank holds {self.num_images} images; set the batch size to it "
                f"(got batch_size={batch_size})"
            )
        labels = self.labels.to(device)
        return SynthBatch(labels=labels, targets=F.one_hot(labels, self.num_classes).float())

    def embed(self, labels: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        return labels.new_zeros(labels.shape[0], 0, dtype=torch.float32)  # no conditioning

    def decode(self, batch: SynthBatch) -> torch.Tensor:
        x = self.pixels
        if self.training and self.jitter:
            dy, dx = torch.randint(-self.jitter, self.jitter + 1, (2,)).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        if self.training and self.flip and torch.rand(()) < 0.5:
            x = x.flip(3)
        return x

    @torch.no_grad()
    def after_step(self) -> None:
        """Clip the pixels to the valid normalized range (called after each generator step)."""
        self.pixels.copy_(torch.maximum(torch.minimum(self.pixels, self.high), self.low))
