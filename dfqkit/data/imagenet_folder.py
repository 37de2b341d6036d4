"""ImageNet validation images laid out as an image folder (``root/<class_dir>/*.JPEG``)."""

from __future__ import annotations

import functools
import math
import os
import re
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
CLASS_INDEX = ("auto", "sorted", "imagenet1k")
WNID = re.compile(r"n\d{8}")


@functools.cache
def imagenet1k_wnids() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k WordNet ids in class-index order (timm's bundled list, offline)."""
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo("imagenet-1k").label_names())


def class_indices(classes: list[str], class_index: str) -> tuple[list[int], int]:
    """Each class directory's index, and the number of classes of the labelling.

    ``"sorted"``: the position of the name in sorted order (``len(classes)`` classes).
    ``"imagenet1k"``: the ImageNet-1k index of the WordNet id (1,000 classes), so a folder that
    holds only some classes still labels them as a 1000-class teacher numbers them.
    ``"auto"``: ``"imagenet1k"`` when every directory is named like a WordNet id (``n`` and
    eight digits), else ``"sorted"``.
    """
    if class_index not in CLASS_INDEX:
        raise ValueError(
            f"imagenet_folder: class_index must be one of {', '.join(CLASS_INDEX)}, "
            f"got {class_index!r}"
        )
    if class_index == "auto":
        wnids = all(WNID.fullmatch(name) for name in classes)
        class_index = "imagenet1k" if wnids else "sorted"
    if class_index == "sorted":
        return list(range(len(classes))), len(classes)
    index = {wnid: i for i, wnid in enumerate(imagenet1k_wnids())}
    unknown = [name for name in classes if name not in index]
    if unknown:
        more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        shown = ", ".join(unknown[:5]) + more
        raise ValueError(
            f"imagenet_folder: class directories {shown} are not ImageNet-1k WordNet ids; "
            "rename them, or set data.imagenet_folder.class_index = 'sorted' to number the "
            "directories in sorted order"
        )
    return [index[name] for name in classes], len(index)


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


def scan_image_folder(
    root: Path, class_index: str = "sorted"
) -> tuple[list[str], list[tuple[Path, int]], int]:
    """Sorted class-directory names, the ``(image path, class index)`` samples under ``root``
    and the number of classes of the labelling (see :func:`class_indices`)."""
    if not root.is_dir():
        raise FileNotFoundError(f"imagenet_folder: root={str(root)!r} is not a directory")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise ValueError(
            f"imagenet_folder: root={str(root)!r} has no class sub-directories; expected "
            "root/<class_dir>/<image>.JPEG"
        )
    indices, num_classes = class_indices(classes, class_index)
    samples = [
        (path, index)
        for index, name in zip(indices, classes)
        for path in sorted((root / name).iterdir())
        if path.suffix.lower() in EXTENSIONS and path.is_file()
    ]
    if not samples:
        raise ValueError(
            f"imagenet_folder: root={str(root)!r} has {len(classes)} class directories but no "
            f"images with extensions {', '.join(EXTENSIONS)}"
        )
    return classes, samples, num_classes


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
    class_index: str = "auto",
) -> EvalData:
    """ImageNet validation (or any labelled image folder) with the usual center-crop transform.

    Layout: ``root/<class_dir>/*.JPEG|jpg|png`` (extensions case-insensitive). Directories
    named by WordNet id (``n01440764``...) get their ImageNet-1k class index, the index of
    torchvision/timm models, even when the folder holds only some of the 1,000 classes
    (``num_classes`` is then 1,000); other names are numbered in sorted order. Each image is
    converted to RGB, resized (shorter side to ``resize``), center-cropped to ``image_size``
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
        class_index: ``"auto"`` (above), ``"imagenet1k"`` (WordNet ids required) or
            ``"sorted"`` (sorted position, whatever the names).

    Returns:
        EvalData with ``num_classes`` = 1,000 for WordNet ids, else the number of class
        directories; no train split.
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
    classes, samples, num_classes = scan_image_folder(Path(root).expanduser(), class_index)
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
        num_classes=num_classes,
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
def timm_imagenet_folder(
    *, root: str, model: str, val: str = "test", class_index: str = "auto"
) -> EvalData:
    """:func:`imagenet_folder` with the transform of a timm model's own data configuration
    (input size, ``resize = size / crop_pct``, interpolation, mean, std), e.g. DeiT:
    224 px, resize 248 (crop 0.9), bicubic, ImageNet mean/std; ViT-B (augreg): mean = std = 0.5.

    Args:
        root: the folder holding one sub-directory per class.
        model: the timm model name (optionally with a pretrained tag).
        val, class_index: as in :func:`imagenet_folder`.
    """
    return imagenet_folder(root=root, val=val, class_index=class_index, **timm_data_config(model))
