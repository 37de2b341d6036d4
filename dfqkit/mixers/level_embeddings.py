"""Multi-level class embeddings (the paper's component (a)).

The teacher is split into ``J`` even consecutive parts (:mod:`dfqkit.models.split`); a small
classifier ``MLP^j: Linear(C_j, D) → ReLU → Linear(D, K)`` is trained on the pooled features at
the end of each part, on synthesized images, and the rows of its last weight ``W^j ∈ R^{K×D}``
are the level-``j`` embeddings of the ``K`` classes: together a ``J × K × D`` tensor.

The classifiers are trained by the generator optimizer from their own cross entropy
(:meth:`LevelEmbeddings.loss`, features detached, so the teacher and the generator are not
changed by it) during the first ``train_epochs`` epochs and frozen afterwards.

Reference: "Enhancing Diversity for Data-free Quantization" (CVPR 2025), supplement (MLP^j
trained for warm-up/5 epochs; the embeddings come from their weights). Which weight becomes the
embedding, the MLP shape and the targets are dfqkit's GUESS (docs/methods/diversity.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dfqkit.models.split import feature_dims, split_points


class LevelEmbeddings(nn.Module):
    """``J`` classifier heads on the teacher's part features; their last weights embed the classes.

    Build with :meth:`bind` (reads the teacher's feature widths), then read :meth:`table`.

    Args:
        levels: ``J`` (>= 1).
        num_classes: ``K``.
        dim: embedding width ``D`` (the heads' hidden width).
    """

    def __init__(self, levels: int, num_classes: int, dim: int) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f"LevelEmbeddings needs levels >= 1, got {levels}")
        self.levels, self.num_classes, self.dim = levels, num_classes, dim
        self.heads = nn.ModuleList()
        self.cut_points: list[str] = []

    @property
    def bound(self) -> bool:
        return len(self.heads) == self.levels

    def bind(self, teacher: nn.Module, example: torch.Tensor) -> None:
        """Find the ``J`` cut points of ``teacher`` and build one head per level."""
        if self.bound:
            return
        self.cut_points = split_points(teacher, self.levels, example)
        widths = feature_dims(teacher, self.cut_points, example)
        self.build(widths)

    def build(self, widths: Sequence[int]) -> None:
        """Create the heads for part feature widths ``C_1..C_J``."""
        if len(widths) != self.levels:
            raise ValueError(f"expected {self.levels} feature widths, got {len(widths)}")
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(c, self.dim), nn.ReLU(), nn.Linear(self.dim, self.num_classes))
            for c in widths
        )

    def table(self) -> torch.Tensor:
        """The ``(J, K, D)`` embedding tensor (rows of each head's last weight)."""
        if not self.bound:
            raise RuntimeError("LevelEmbeddings is not bound to a teacher yet: call bind()")
        return torch.stack([head[-1].weight for head in self.heads])

    def loss(self, features: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """``Σ_j CE(MLP^j(h^j), targets)`` on detached part features.

        Args:
            features: ``J`` pooled features ``(b, C_j)``.
            targets: ``(b, K)`` soft (or one-hot) labels.
        """
        targets = targets.detach().float()
        total = None
        for head, h in zip(self.heads, features, strict=True):
            logp = head(h.detach().float()).log_softmax(-1)
            value = -(targets * logp).sum(-1).mean()
            total = value if total is None else total + value
        return total
