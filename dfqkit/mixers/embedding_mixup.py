"""Qimera's superposed class embeddings: synthetic boundary-supporting samples."""

from __future__ import annotations

import torch
from torch import nn

from dfqkit.mixers.base import Mixer
from dfqkit.registry import register
from dfqkit.step import SynthBatch


@register("mixers")
class EmbeddingMixup(Mixer):
    """Superposes the generator's conditioning of ``K`` classes with random coefficients.

    With probability ``prob`` a sample is mixed: ``K`` distinct classes are drawn (its own label
    first), ``λ = softmax(N(0, I_K))``, and the generator's input is
    ``Σ_k λ_k · embed(y_k, z_k)`` with an independent latent ``z_k`` per component; the soft
    target is ``Σ_k λ_k onehot(y_k)`` (one-hot when unmixed), which conditional-BN generators
    also read. Works with any generator exposing ``embed(labels, z)``.

    Reference: Choi et al., "Qimera: Data-free Quantization with Synthetic Boundary Supporting
    Samples", NeurIPS 2021 (``multi_label_prob`` = ``prob``, ``multi_label_num`` = ``K``
    in the official code; docs/methods.md).

    Args:
        num_classes: classes of the generator (``None``: the generator's, at bind time).
        classes_per_sample: ``K`` (capped at ``num_classes``).
        prob: probability that a sample is a superposition.
    """

    stage = "cond"

    def __init__(
        self, *, num_classes: int | None = None, classes_per_sample: int = 2, prob: float = 0.4
    ):
        super().__init__()
        if (
            isinstance(classes_per_sample, bool)
            or not isinstance(classes_per_sample, int)
            or (classes_per_sample < 1)
        ):
            raise ValueError(
                f"EmbeddingMixup.classes_per_sample must be an integer >= 1, "
                f"got {classes_per_sample!r}"
            )
        if not (isinstance(prob, int | float) and 0.0 <= prob <= 1.0):
            raise ValueError(f"EmbeddingMixup.prob must be in [0, 1], got {prob!r}")
        self.num_classes = num_classes
        self._k = classes_per_sample
        self.k = classes_per_sample if num_classes is None else min(classes_per_sample, num_classes)
        self.prob = float(prob)

    def bind(self, *, teacher: nn.Module, generator: nn.Module, example: torch.Tensor) -> None:
        if self.num_classes is None:
            self.num_classes = getattr(generator, "module", generator).num_classes
            self.k = min(self._k, self.num_classes)

    def forward(self, batch: SynthBatch, generator: nn.Module) -> SynthBatch:
        if self.num_classes is None:
            raise RuntimeError("EmbeddingMixup is not bound: the trainer calls bind() first")
        labels, z = batch.labels, batch.z
        b, device = labels.shape[0], labels.device
        scores = torch.rand(b, self.num_classes, device=device)
        scores.scatter_(1, labels[:, None], 2.0)  # the own label first
        classes = scores.topk(self.k, dim=1).indices  # (b, K)
        mixed = torch.rand(b, 1, device=device) < self.prob
        noise = torch.randn(b, self.k, device=device)
        noise[:, 1:] = noise[:, 1:].masked_fill(~mixed, float("-inf"))
        lam = noise.softmax(-1)  # (b, K); one-hot on the own label when unmixed
        zs = torch.cat([z[:, None], torch.randn(b, self.k - 1, z.shape[1], device=device)], 1)
        cond = generator.embed(classes.flatten(), zs.flatten(0, 1))
        cond = (lam[:, :, None] * cond.view(b, self.k, -1)).sum(1)
        targets = torch.zeros(b, self.num_classes, device=device).scatter_add(1, classes, lam)
        return batch.replace(
            cond=cond,
            targets=targets,
            labels=targets.argmax(1),
            mix={"classes": classes, "lam": lam},
        )

    def extra_repr(self) -> str:
        return f"classes_per_sample={self.k}, prob={self.prob}"
