"""Top-1 / top-5 accuracy (and agreement with the teacher) on a real loader."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    teacher: nn.Module | None = None,
    device: torch.device | str = "cpu",
    accelerator=None,
) -> dict[str, float]:
    """Accuracy of ``model`` on ``loader`` in eval mode.

    Args:
        model: classifier returning logits ``(b, k)``.
        loader: yields ``(images (b, c, h, w), labels (b,))``.
        teacher: when given, also the fraction of images where ``model`` and ``teacher`` agree.
        accelerator: when given, predictions are gathered across processes with
            ``gather_for_metrics`` (each process then evaluates its shard of a prepared loader).

    Returns:
        ``{"top1": %, "top5": %, "n": count}`` (+ ``"agree"`` with a teacher), percentages.
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64)  # top1, top5, agree, n
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images).float()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices  # (b, k)
        hit1 = top[:, 0] == labels
        hit5 = (top == labels[:, None]).any(-1)
        agree = top[:, 0] == teacher(images).argmax(-1) if teacher is not None else hit1
        stats = torch.stack([hit1, hit5, agree], dim=1).to(torch.float64)  # (b, 3)
        if accelerator is not None:
            stats = accelerator.gather_for_metrics(stats)
        counts[:3] += stats.sum(0).cpu()
        counts[3] += stats.shape[0]
    model.train(was_training)
    n = max(counts[3].item(), 1.0)
    out = {"top1": 100 * counts[0].item() / n, "top5": 100 * counts[1].item() / n, "n": int(n)}
    if teacher is not None:
        out["agree"] = 100 * counts[2].item() / n
    return out
