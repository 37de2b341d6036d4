"""ImageNet validation images laid out as an image folder (``root/<class_dir>/*.JPEG``)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import transforms

from dfqkit.data.eval_data import EvalData, data_factory
from dfqkit.data.stratified_split import parse_holdout, stratified_split

EXTENSIONS = (".jpeg", ".jpg", ".png")
INTERPOLATIONS = {
    "nearest": transforms.InterpolationMode.NEAREST,
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
}
HOLDOUT_SEED = 0


class ImageFolderDataset(Dataset):
    """``(path, class index)`` samples read and transformed on access (RGB)."""

    def __init__(self, samples: list[tuple[Path, int]], *, transform: transforms.Compose) -> None:
        self.samples = samples
        self.targets = [label for _, label in samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


def scan_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Sorted class-directory names and the ``(image path, class index)`` samples under ``root``."""
    if not root.is_dir():
        raise FileNotFoundError(f"imagenet_folder: root={str(root)!r} is not a directory")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise ValueError(
            f"imagenet_folder: root={str(root)!r} has no class sub-directories; expected "
            "root/<class_dir>/<image>.JPEG"
        )
    samples = [
        (path, index)
        for index, name in enumerate(classes)
        for path in sorted((root / name).iterdir())
        if path.suffix.lower() in EXTENSIONS and path.is_file()
    ]
    if not samples:
        raise ValueError(
            f"imagenet_folder: root={str(root)!r} has {len(classes)} class directories but no "
            f"images with extensions {', '.join(EXTENSIONS)}"
        )
    return classes, samples


@data_factory
def imagenet_folder(
    *,
    root: str,
    image_size: int = 224,
    resize: int = 256,
    mean: tuple[float, ...] = (0.485, 0.456, 0.406),
    std: tuple[float, ...] = (0.229, 0.224, 0.225),
    interpolation: str = "bilinear",
    val: str = "test",
) -> EvalData:
    """ImageNet validation (or any labelled image folder) with the usual center-crop transform.

    Layout: ``root/<class_dir>/*.JPEG|jpg|png`` (extensions case-insensitive). Class index =
    position of the directory in *sorted* order of names, which for ImageNet's ``n01440764``...
    synset directories is the standard 1000-class index of torchvision/timm models. Each image
    is converted to RGB, resized (shorter side to ``resize``), center-cropped to ``image_size``
    and normalized with ``mean``/``std``.

    Args:
        root: the folder holding one sub-directory per class.
        image_size: crop size (height = width).
        resize: shorter-side size before cropping (256 for 224 crops: ratio 0.875).
        mean: per-channel normalization mean.
        std: per-channel normalization std.
        interpolation: ``"bilinear"``, ``"bicubic"`` or ``"nearest"``.
        val: ``"test"``: validation is the test set; a fraction string such as ``"0.1"`` holds
            that stratified share out as validation (fixed seed) and tests on the rest.

    Returns:
        EvalData with ``num_classes`` = number of class directories; no train split.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}"
        )
    if image_size <= 0 or resize < image_size:
        raise ValueError(
            f"need 0 < image_size <= resize, got image_size={image_size}, resize={resize}"
        )
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={mean}, std={std}")
    holdout = parse_holdout(val)
    classes, samples = scan_image_folder(Path(root).expanduser())
    transform = transforms.Compose(
        [
            transforms.Resize(resize, interpolation=INTERPOLATIONS[interpolation]),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )
    full = ImageFolderDataset(samples, transform=transform)
    if holdout is None:
        val_set: Dataset = full
        test_set: Dataset = full
    else:
        val_idx, test_idx = stratified_split(
            np.asarray(full.targets), seed=HOLDOUT_SEED, fractions=(holdout, 1.0 - holdout)
        )
        val_set, test_set = Subset(full, val_idx.tolist()), Subset(full, test_idx.tolist())
    return EvalData(
        name="imagenet_folder",
        num_classes=len(classes),
        image_size=image_size,
        channels=3,
        mean=tuple(mean),
        std=tuple(std),
        val=val_set,
        test=test_set,
        num_workers=min(8, os.cpu_count() or 1),
    )


def timm_data_config(model: str) -> dict:
    """Input size, crop ratio, interpolation, mean and std of a timm model, by name (offline:
    read from timm's registry of pretrained configurations, no download)."""
    import timm

    base = model.split(".")[0]
    if not timm.is_model(base):
        raise ValueError(f"model={model!r} is not a timm model (see timm.list_models())")
    cfg = timm.models.get_pretrained_cfg(model) or timm.models.get_pretrained_cfg(base)
    if cfg is None:
        raise ValueError(f"timm has no data configuration for {model!r}")
    size = cfg.input_size[-1]
    return {
        "image_size": size,
        "resize": int(math.floor(size / cfg.crop_pct)),
        "mean": tuple(cfg.mean),
        "std": tuple(cfg.std),
        "interpolation": cfg.interpolation if cfg.interpolation in INTERPOLATIONS else "bicubic",
    }


@data_factory
def timm_imagenet_folder(*, root: str, model: str, val: str = "test") -> EvalData:
    """:func:`imagenet_folder` with the transform of a timm model's own data configuration
    (input size, ``resize = size / crop_pct``, interpolation, mean, std), e.g. DeiT:
    224 px, resize 248 (crop 0.9), bicubic, ImageNet mean/std; ViT-B (augreg): mean = std = 0.5.

    Args:
        root: the folder holding one sub-directory per class.
        model: the timm model name (optionally with a pretrained tag).
        val: as in :func:`imagenet_folder`.
    """
    return imagenet_folder(root=root, val=val, **timm_data_config(model))
