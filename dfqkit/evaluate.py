"""Top-1 / top-5 accuracy (and agreement with the teacher) on a real loader."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    teacher: nn.Module | torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    accelerator=None,
    predictions: bool = False,
) -> dict[str, Any]:
    """Accuracy of ``model`` on ``loader`` in eval mode.

    Args:
        model: classifier returning logits ``(b, k)``.
        loader: yields ``(images (b, c, h, w), labels (b,))``.
        teacher: when given, also the fraction of images where ``model`` and ``teacher`` agree;
            a module, or its top-1 predictions over ``loader`` in the loader's order (this
            process's shard), as ``predictions=True`` returns them — a teacher's predictions on
            a fixed evaluation set never change, so a run computes them once.
        accelerator: when given, predictions are gathered across processes with
            ``gather_for_metrics`` (each process then evaluates its shard of a prepared loader).
        predictions: also return ``model``'s top-1 predictions, ``(n,)`` on the CPU, in the
            loader's order, this process's shard only.

    Returns:
        ``{"top1": %, "top5": %, "n": count}`` (+ ``"agree"`` with a teacher, + ``"predictions"``),
        percentages.
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64)  # top1, top5, agree, n
    seen, preds = 0, []
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images).float()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices  # (b, k)
        hit1 = top[:, 0] == labels
        hit5 = (top == labels[:, None]).any(-1)
        if isinstance(teacher, torch.Tensor):
            ref = teacher[seen : seen + labels.shape[0]].to(top.device)
            if ref.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"evaluate: teacher predictions cover {teacher.shape[0]} images, the loader "
                    f"has more (batch ending at image {seen + labels.shape[0]})"
                )
            agree = top[:, 0] == ref
        elif teacher is not None:
            agree = top[:, 0] == teacher(images).argmax(-1)
        else:
            agree = hit1
        seen += labels.shape[0]
        if predictions:
            preds.append(top[:, 0].cpu())
        stats = torch.stack([hit1, hit5, agree], dim=1).to(torch.float64)  # (b, 3)
        if accelerator is not None:
            stats = accelerator.gather_for_metrics(stats)
        counts[:3] += stats.sum(0).cpu()
        counts[3] += stats.shape[0]
    model.train(was_training)
    n = max(counts[3].item(), 1.0)
    out = {"top1": 100 * counts[0].item() / n, "top5": 100 * counts[1].item() / n, "n": int(n)}
    if isinstance(teacher, torch.Tensor) and seen != teacher.shape[0]:
        raise ValueError(
            f"evaluate: teacher predictions cover {teacher.shape[0]} images, the loader {seen}"
        )
    if teacher is not None:
        out["agree"] = 100 * counts[2].item() / n
    if predictions:
        out["predictions"] = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    return out
