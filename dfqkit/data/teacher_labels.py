"""Evaluation sets labelled by the float teacher: top-1 on them is **agreement with the float
model** (fidelity), not accuracy.

* :func:`unlabelled_folder`: any folder of images, without classes (photos, crops, a sample of
  your production inputs).
* :func:`label_with_teacher`: what the run builder applies to such a set once the teacher
  exists (``EvalData.labelled_by == "teacher"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms

from dfqkit.data.eval_data import EvalData, data_factory
from dfqkit.data.imagenet_folder import EXTENSIONS, INTERPOLATIONS, ImageFolderDataset

SPLIT_SEED = 0


class Relabelled(Dataset):
    """``dataset``'s images with ``labels`` instead of its own."""

    def __init__(self, dataset: Dataset, labels: torch.Tensor) -> None:
        self.dataset, self.labels = dataset, labels.long()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.dataset[index][0], int(self.labels[index])


@torch.no_grad()
def _predictions(teacher: nn.Module, dataset: Dataset, device: torch.device) -> torch.Tensor:
    loader = DataLoader(dataset, batch_size=256, shuffle=False)
    return torch.cat([teacher(x.to(device)).argmax(-1).cpu() for x, _ in loader])


def label_with_teacher(data: EvalData, teacher: nn.Module, device: torch.device) -> EvalData:
    """``data`` with its val and test images labelled by ``teacher``'s top-1 (one pass each).
    ``data.labelled_by`` becomes ``"teacher"``: top-1 on it is agreement with the teacher."""
    splits = {"val": data.val} if data.val is data.test else {"val": data.val, "test": data.test}
    relabelled = {s: Relabelled(ds, _predictions(teacher, ds, device)) for s, ds in splits.items()}
    relabelled.setdefault("test", relabelled["val"])
    out = EvalData(
        name=data.name,
        num_classes=data.num_classes,
        image_size=data.image_size,
        channels=data.channels,
        mean=data.mean,
        std=data.std,
        val=relabelled["val"],
        test=relabelled["test"],
        num_workers=data.num_workers,
        source=data.source,
        labelled_by="teacher",
    )
    return out


def _images(root: Path) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"unlabelled_folder: root={str(root)!r} is not a directory")
    found = sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    if len(found) < 2:
        raise ValueError(
            f"unlabelled_folder: root={str(root)!r} holds {len(found)} image(s) with extensions "
            f"{', '.join(EXTENSIONS)}; need at least 2 (one for val, one for test)"
        )
    return found


@data_factory
def unlabelled_folder(
    *,
    root: str,
    num_classes: int,
    image_size: int = 224,
    resize: int = 256,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    interpolation: str = "bilinear",
    val_fraction: float = 0.5,
) -> EvalData:
    """Every image under ``root`` (any depth, no class folders), center-cropped like
    :func:`~dfqkit.data.imagenet_folder`, split at random (fixed seed) into val and test, and
    labelled by the teacher when the run is built: top-1 is agreement with the float model.

    Args:
        root: a folder of images (``.jpg``, ``.jpeg``, ``.png``, any depth).
        num_classes: the teacher's classes.
        image_size, resize, mean, std, interpolation: the teacher's input transform.
        val_fraction: share of the images used for model selection (the rest are reported).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}"
        )
    paths = _images(Path(root).expanduser())
    transform = transforms.Compose(
        [
            transforms.Resize(resize, interpolation=INTERPOLATIONS[interpolation]),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(tuple(mean), tuple(std)),
        ]
    )
    full = ImageFolderDataset([(p, -1) for p in paths], transform=transform)
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = min(max(1, round(val_fraction * len(paths))), len(paths) - 1)
    return EvalData(
        name="unlabelled_folder",
        num_classes=num_classes,
        image_size=image_size,
        channels=3,
        mean=tuple(mean),
        std=tuple(std),
        val=Subset(full, order[:n_val].tolist()),
        test=Subset(full, order[n_val:].tolist()),
        labelled_by="teacher",
    )
