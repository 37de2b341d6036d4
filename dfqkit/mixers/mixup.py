"""Mixup of synthesized images and their labels (MixMix's data mixing)."""

from __future__ import annotations

import torch
from torch import nn

from dfqkit.mixers.base import Mixer
from dfqkit.registry import register
from dfqkit.step import SynthBatch


def blend(batch_size: int, alpha: float, prob: float, device: torch.device):
    """A partner permutation and per-sample weights ``λ ~ Beta(α, α)`` (1 for the unmixed
    share ``1 - prob``): ``(perm (b,), lam (b,))``."""
    perm = torch.randperm(batch_size, device=device)
    lam = torch.distributions.Beta(alpha, alpha).sample((batch_size,)).to(device)
    if prob < 1.0:
        keep = torch.rand(batch_size, device=device) >= prob
        lam = torch.where(keep, torch.ones_like(lam), lam)
    return perm, lam


def _check(name: str, alpha: float, prob: float) -> None:
    if not (isinstance(alpha, int | float) and alpha > 0):
        raise ValueError(f"{name}.alpha must be > 0, got {alpha!r}")
    if not (isinstance(prob, int | float) and 0.0 <= prob <= 1.0):
        raise ValueError(f"{name}.prob must be in [0, 1], got {prob!r}")


class _ImageBlend(Mixer):
    """Blends each image with a random partner of the batch: ``x = λ x_i + (1 − λ) x_π(i)``."""

    stage = "image"

    def __init__(self, *, alpha: float = 1.0, prob: float = 1.0) -> None:
        super().__init__()
        _check(type(self).__name__, alpha, prob)
        self.alpha, self.prob = float(alpha), float(prob)

    def _blend(self, batch: SynthBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(blended images, perm (b,), lam (b,))``."""
        x = batch.images
        perm, lam = blend(x.shape[0], self.alpha, self.prob, x.device)
        w = lam.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return w * x + (1 - w) * x[perm], perm, lam

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, prob={self.prob}"


@register("mixers")
class Mixup(_ImageBlend):
    """Blends each synthesized image with a random partner of the batch, labels alike.

    ``x = λ x_i + (1 − λ) x_π(i)``, ``t = λ t_i + (1 − λ) t_π(i)`` with ``λ ~ Beta(α, α)`` per
    sample and ``π`` a random permutation; a sample is mixed with probability ``prob``. The
    hard label is the dominant one. Gradients reach the generator through both images.

    Reference: MixMix (Li et al., CVPR 2021), data mixing; Zhang et al., "mixup", ICLR 2018.

    Args:
        alpha: Beta distribution parameter.
        prob: share of mixed samples.
    """

    def forward(self, batch: SynthBatch, generator: nn.Module) -> SynthBatch:
        images, perm, lam = self._blend(batch)
        targets = batch.targets
        if targets is not None:
            targets = lam[:, None] * targets + (1 - lam[:, None]) * targets[perm]
        labels = torch.where(lam >= 0.5, batch.labels, batch.labels[perm])
        return batch.replace(
            images=images, targets=targets, labels=labels, mix={"perm": perm, "lam": lam}
        )


@register("mixers")
class ImageOnlyMixup(_ImageBlend):
    """Blends images like :class:`Mixup` but interpolates no labels: the target of a blend is
    the teacher's own prediction on it (``batch.targets = None``; :class:`SoftTargetCE` then
    uses the teacher's softmax).

    Reference: TexQ (Chen et al., NeurIPS 2023), mixup knowledge distillation.

    Args:
        alpha: Beta distribution parameter.
        prob: share of mixed samples.
    """

    def forward(self, batch: SynthBatch, generator: nn.Module) -> SynthBatch:
        images, perm, lam = self._blend(batch)
        return batch.replace(images=images, targets=None, mix={"perm": perm, "lam": lam})
