"""EvalData: a labelled image dataset split into train/val/test, with its normalization."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gin
import torch
from torch.utils.data import DataLoader, Dataset

SPLITS: tuple[str, ...] = ("train", "val", "test")
LABELLED_BY = ("dataset", "teacher")


class TensorImageDataset(Dataset):
    """Images and labels held in memory as tensors (fast evaluation of small sets).

    Args:
        images: ``(n, c, h, w)`` images; already normalized unless ``transform`` is given.
        labels: ``(n,)`` integer class indices.
        transform: optional per-image function applied on access, e.g. uint8 → normalized
            float32 (keeps large sets such as CIFAR in memory as uint8).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be (n, c, h, w), got shape {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must have shape ({images.shape[0]},) to match images, "
                f"got {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def subset(self, indices: torch.Tensor) -> TensorImageDataset:
        """A new dataset holding the rows ``indices`` (copied, same transform)."""
        return TensorImageDataset(
            self.images[indices], self.labels[indices], transform=self.transform
        )


def data_factory(fn: Callable[..., EvalData]) -> Callable[..., EvalData]:
    """Decorator: register ``fn`` with gin as ``@data.<name>()``; the :class:`EvalData` it
    returns remembers the call (``source``)."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def build(*args: Any, **kwargs: Any) -> EvalData:
        data = fn(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        data.source = (fn.__name__, dict(bound.arguments))
        return data

    gin.register(build, module="dfqkit.data")
    return build


def scale_and_normalize(
    image: torch.Tensor, *, max_value: float, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """``(c, h, w)`` raw pixels in ``[0, max_value]`` → normalized float32 ``(x - mean) / std``."""
    return (image.float() / max_value - mean) / std


@dataclass
class EvalData:
    """A dataset as the trainer and the evaluator see it.

    Attributes:
        name: short name, e.g. ``"mnist5k"``.
        num_classes: number of classes ``k``; labels are in ``0..k-1``.
        image_size: height = width of the images.
        channels: number of image channels ``c``.
        mean: per-channel mean used for normalization.
        std: per-channel std used for normalization.
        val: validation split (model/epoch selection).
        test: test split (reported accuracy).
        train: training split, ``None`` when there is none (DFQ never reads it).
        num_workers: default DataLoader workers (0 for in-memory sets).
        source: ``(factory, arguments)`` of the registered factory that made it
            (:func:`data_factory`), so a run can record how to load it again; ``None`` for a
            set built by hand.
        labelled_by: ``"dataset"`` (its own labels: top-1 is accuracy) or ``"teacher"`` (the
            run labels val and test with the float teacher's top-1 when it is built: top-1 is
            agreement with the float model, not accuracy).
        prepare: a callable ``(teacher, device) -> EvalData`` the run calls once the teacher
            exists, for sets made from the teacher itself (the data-free evaluation set).

    Every split yields ``(image, label)`` with ``image`` a normalized float32 ``(c, h, w)``.
    """

    name: str
    num_classes: int
    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val: Dataset
    test: Dataset
    train: Dataset | None = None
    num_workers: int = 0
    source: tuple[str, dict[str, Any]] | None = None
    labelled_by: str = "dataset"
    prepare: Callable[..., EvalData] | None = None

    def __post_init__(self) -> None:
        if self.labelled_by not in LABELLED_BY:
            raise ValueError(
                f"EvalData.labelled_by must be one of {LABELLED_BY}, got {self.labelled_by!r}"
            )

    def split(self, split: str) -> Dataset:
        """The dataset of ``split`` (one of ``"train"``, ``"val"``, ``"test"``)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        dataset = getattr(self, split)
        if dataset is None:
            raise ValueError(f"dataset {self.name!r} has no {split!r} split")
        return dataset

    def loader(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        num_workers: int | None = None,
    ) -> DataLoader:
        """A DataLoader over ``split``.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            batch_size: images per batch (> 0).
            shuffle: reshuffle every epoch, from a local generator seeded with ``seed``
                (global RNG state is neither read nor changed).
            seed: shuffling seed.
            num_workers: DataLoader workers; ``None`` uses ``self.num_workers``.

        Returns:
            A loader yielding ``images (b, c, h, w)`` float32 and ``labels (b,)`` int64.
        """
        dataset = self.split(split)
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers if num_workers is None else num_workers,
        )
