"""Qimera's superposed class embeddings: synthetic boundary-supporting samples."""

from __future__ import annotations

import torch
from torch import nn

from dfqkit.mixers.base import Mixer
from dfqkit.registry import register
from dfqkit.step import SynthBatch

GRANULARITIES = ("batch", "sample")


@register("mixers")
class EmbeddingMixup(Mixer):
    """Superposes the generator's conditioning of ``K`` classes with random coefficients.

    A mixed sample's ``K`` classes get ``λ = softmax(N(0, I_K))`` and independent latents
    ``z_k``; the generator's input is ``Σ_k λ_k · embed(y_k, z_k)`` and the soft target
    ``Σ_k λ_k onehot(y_k)`` (one-hot when unmixed), which conditional-BN generators also read.

    * ``granularity="batch"`` (the official code): with probability ``prob`` the *whole batch*
      is mixed, its ``K`` classes drawn independently, with replacement (a class drawn twice
      adds up in the target); a generator with ``embed_slots`` normalises the ``(b, K, d)``
      inputs together (Qimera's own generator). The decision is drawn on the CPU, so no value
      is read from the device.
    * ``granularity="sample"`` (dfqkit before 0.2): each sample is mixed with probability
      ``prob``, its ``K`` classes distinct with its own label first.

    Works with any generator exposing ``embed(labels, z)``.

    Reference: Choi et al., "Qimera: Data-free Quantization with Synthetic Boundary Supporting
    Samples", NeurIPS 2021 (``multi_label_prob`` = ``prob``, ``multi_label_num`` = ``K``
    in the official code; docs/methods.md).

    Args:
        num_classes: classes of the generator (``None``: the generator's, at bind time).
        classes_per_sample: ``K`` (``"sample"``: capped at ``num_classes``, distinct classes).
        prob: probability that a batch (or a sample) is a superposition.
        granularity: ``"batch"`` (official) or ``"sample"``.
    """

    stage = "cond"

    def __init__(
        self,
        *,
        num_classes: int | None = None,
        classes_per_sample: int = 2,
        prob: float = 0.4,
        granularity: str = "batch",
    ):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"EmbeddingMixup.granularity must be one of {GRANULARITIES}, got {granularity!r}"
            )
        self.granularity = granularity
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
        if self.granularity == "batch":
            return self._batch(batch, generator)
        return self._per_sample(batch, generator)

    def unmixed(self, batch: SynthBatch, generator: nn.Module) -> SynthBatch:
        """The generator's own conditioning of each sample's label, one-hot targets."""
        labels = batch.labels
        targets = nn.functional.one_hot(labels, self.num_classes).float()
        mixed = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
        return batch.replace(
            cond=generator.embed(labels, batch.z), targets=targets, mix={"mixed": mixed}
        )

    def _batch(self, batch: SynthBatch, generator: nn.Module) -> SynthBatch:
        labels, z = batch.labels, batch.z
        b, device = labels.shape[0], labels.device
        if not bool(torch.rand(()) < self.prob):  # CPU draw: no device sync
            return self.unmixed(batch, generator)
        k = self._k  # drawn with replacement: K may exceed the number of classes
        classes = torch.randint(0, self.num_classes, (b, k), device=device)
        lam = torch.randn(b, k, device=device).softmax(-1)
        zs = torch.cat([z[:, None], torch.randn(b, k - 1, z.shape[1], device=device)], 1)
        if hasattr(generator, "embed_slots"):
            cond = generator.embed_slots(classes, zs)  # (b, K, d), normalised together
        else:
            cond = generator.embed(classes.flatten(), zs.flatten(0, 1)).view(b, k, -1)
        cond = (lam[:, :, None] * cond).sum(1)
        targets = torch.zeros(b, self.num_classes, device=device).scatter_add(1, classes, lam)
        mixed = torch.ones(b, dtype=torch.bool, device=device)
        return batch.replace(
            cond=cond,
            targets=targets,
            labels=targets.argmax(1),
            mix={"classes": classes, "lam": lam, "mixed": mixed},
        )

    def _per_sample(self, batch: SynthBatch, generator: nn.Module) -> SynthBatch:
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
            mix={"classes": classes, "lam": lam, "mixed": mixed[:, 0]},
        )

    def extra_repr(self) -> str:
        return f"classes_per_sample={self.k}, prob={self.prob}, granularity={self.granularity!r}"
