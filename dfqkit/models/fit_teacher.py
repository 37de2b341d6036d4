"""Supervised training of a zoo teacher: deterministic on CPU, selected on val, scored on test."""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dfqkit.data.eval_data import EvalData, TensorImageDataset

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class TrainRecipe:
    """How a zoo teacher is trained (defaults: the MNIST ResNet's recipe).

    Attributes:
        epochs: passes over the train split.
        batch_size: images per step.
        optimizer: ``"sgd"`` (momentum, Nesterov) or ``"adamw"``.
        lr: peak learning rate, reached after ``warmup_epochs`` of linear warm-up, then cosine
            decay to 0 (per step).
        momentum: SGD momentum.
        weight_decay: L2 / decoupled weight decay.
        warmup_epochs: linear warm-up length.
        max_shift: random translation of each image by up to this many pixels (0: none).
    """

    epochs: int = 20
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    max_shift: int = 2

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for field in ("epochs", "batch_size"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.max_shift < 0 or self.warmup_epochs < 0:
            raise ValueError("max_shift and warmup_epochs must be >= 0")


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of ``x (b, c, h, w)`` by its own random offset in ±``max_shift``.

    Borders are filled by replicating the edge (the background for digits).
    """
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate").permute(0, 2, 3, 1)  # (b, h', w', c)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b, 1), generator=generator)
    rows = (dy + torch.arange(h))[:, :, None]  # (b, h, 1)
    cols = (dx + torch.arange(w))[:, None, :]  # (b, 1, w)
    shifted = padded[torch.arange(b)[:, None, None], rows, cols]  # (b, h, w, c)
    return shifted.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def top1(model: nn.Module, dataset: TensorImageDataset, *, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent of ``model`` (put in eval mode) on an in-memory dataset."""
    model.eval()
    correct = 0
    for start in range(0, len(dataset), batch_size):
        images = dataset.images[start : start + batch_size]
        if dataset.transform is not None:
            images = torch.stack([dataset.transform(image) for image in images])
        logits = model(images)
        correct += int((logits.argmax(1) == dataset.labels[start : start + batch_size]).sum())
    return 100.0 * correct / len(dataset)


def _optimizer(model: nn.Module, recipe: TrainRecipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=recipe.lr,
            momentum=recipe.momentum,
            nesterov=True,
            weight_decay=recipe.weight_decay,
        )
    return torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)


def fit_teacher(
    model: nn.Module, data: EvalData, *, recipe: TrainRecipe, seed: int
) -> tuple[dict[str, torch.Tensor], dict]:
    """Train ``model`` on ``data.train``; keep the epoch with the best val top-1.

    Deterministic: shuffling and augmentation draw from a local generator seeded with ``seed``
    and deterministic algorithms are enforced, so the same model init, data and seed give
    bit-identical weights on the same CPU build. (Seed the model's init before calling.)

    Args:
        model: the network to train (in place; left holding the best epoch's weights).
        data: EvalData whose train/val/test splits are :class:`TensorImageDataset`.
        recipe: optimization settings.
        seed: shuffling / augmentation seed.

    Returns:
        The best epoch's state dict and metrics: ``test_top1`` and ``val_top1`` (percent, at
        the best-val epoch), ``best_epoch``, ``last_test_top1``, ``seconds``, ...
    """
    for split in ("train", "val", "test"):
        if not isinstance(getattr(data, split), TensorImageDataset):
            raise ValueError(f"fit_teacher needs in-memory splits; {data.name}.{split} is not")
    train = data.train
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    total, warmup = recipe.epochs * steps_per_epoch, recipe.warmup_epochs * steps_per_epoch

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    optimizer = _optimizer(model, recipe)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    best_val, best_epoch, best_state = -1.0, 0, copy.deepcopy(model.state_dict())
    try:
        for epoch in range(1, recipe.epochs + 1):
            model.train()
            order = torch.randperm(len(train), generator=generator)
            running = 0.0
            for batch in order.split(recipe.batch_size):
                images = random_shift(train.images[batch], recipe.max_shift, generator)
                loss = F.cross_entropy(model(images), train.labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                running += float(loss.detach()) * len(batch)
            val = top1(model, data.val)
            if val >= best_val:  # ties go to the later, more annealed epoch
                best_val, best_epoch = val, epoch
                best_state = copy.deepcopy(model.state_dict())
            logger.info(
                "epoch %d/%d  loss %.4f  val top-1 %.2f%%  (best %.2f%% @ %d)  %.0fs",
                epoch,
                recipe.epochs,
                running / len(train),
                val,
                best_val,
                best_epoch,
                time.perf_counter() - start,
            )
    finally:
        torch.use_deterministic_algorithms(deterministic)
    last_test = top1(model, data.test)
    model.load_state_dict(best_state)
    metrics = {
        "test_top1": top1(model, data.test),
        "val_top1": best_val,
        "best_epoch": best_epoch,
        "last_test_top1": last_test,
        "seed": seed,
        "epochs": recipe.epochs,
        "seconds": round(time.perf_counter() - start, 2),
        "torch_version": torch.__version__,
        "params": sum(p.numel() for p in model.parameters()),
        "train_images": len(train),
        "recipe": asdict(recipe),
    }
    return {k: v.detach().clone().contiguous() for k, v in best_state.items()}, metrics
