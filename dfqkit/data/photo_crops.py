"""Crops of scikit-learn's two bundled photos, labelled by the teacher: an offline ImageNet-size
evaluation set whose top-1 is **agreement with the float model** (fidelity), not accuracy."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchvision.transforms.v2 import functional as TF

from dfqkit.data.eval_data import EvalData, TensorImageDataset, data_factory, scale_and_normalize
from dfqkit.data.imagenet_folder import INTERPOLATIONS
from dfqkit.optional import require

SPLIT_SEED = 0


def _crop_box(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], g
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop covering ``scale`` of the area at an aspect ratio
    in ``ratio`` (log-uniform), as torchvision's RandomResizedCrop draws it; the whole photo
    when ten draws do not fit."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand((), generator=g).item())
        aspect = math.exp(
            log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand((), generator=g).item()
        )
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return top, left, h, w
    return 0, 0, height, width


@data_factory
def photo_crops(
    *,
    num_classes: int,
    num_images: int = 768,
    image_size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    interpolation: str = "bilinear",
    val_fraction: float = 0.5,
    seed: int = 0,
) -> EvalData:
    """``num_images`` random crops of scikit-learn's two bundled photos (``china.jpg`` and
    ``flower.jpg``, 427 × 640), each resized to ``image_size`` and flipped at random, drawn
    from a local generator seeded with ``seed`` (the same set on every machine), held in memory
    as uint8 and normalized with ``mean``/``std`` on access; split at random (fixed seed) into
    val and test. The run labels both splits with the float teacher's top-1 when it is built,
    so top-1 on this set is agreement with the float model, on real photographs.

    Args:
        num_classes: the teacher's classes.
        num_images: crops in all (val + test).
        image_size: crop size after resizing (the teacher's input size).
        scale: range of the crop's share of the photo's area.
        ratio: range of the crop's aspect ratio.
        mean, std: the teacher's input normalization.
        interpolation: ``"bilinear"``, ``"bicubic"`` or ``"nearest"``.
        val_fraction: share of the crops used for model selection (the rest are reported).
        seed: the crops' seed.

    Raises:
        MissingDependency: scikit-learn is not installed.
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 2:
        raise ValueError(f"photo_crops: num_images must be an integer >= 2, got {num_images!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"photo_crops: val_fraction must be in (0, 1), got {val_fraction!r}")
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"photo_crops: need 0 < scale[0] <= scale[1] <= 1, got {scale!r}")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"photo_crops: need 0 < ratio[0] <= ratio[1], got {ratio!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"photo_crops: interpolation must be one of {', '.join(INTERPOLATIONS)}, "
            f"got {interpolation!r}"
        )
    datasets = require(
        "sklearn.datasets", extra="data", purpose="data.photo_crops", package="scikit-learn"
    )
    photos = [
        torch.from_numpy(p.copy()).permute(2, 0, 1) for p in datasets.load_sample_images().images
    ]
    g = torch.Generator().manual_seed(seed)
    crops = torch.empty(num_images, 3, image_size, image_size, dtype=torch.uint8)
    mode = INTERPOLATIONS[interpolation]
    for i in range(num_images):
        photo = photos[int(torch.randint(0, len(photos), (), generator=g))]
        top, left, h, w = _crop_box(photo.shape[1], photo.shape[2], scale, ratio, g)
        size = [image_size, image_size]
        crop = TF.resized_crop(photo, top, left, h, w, size, mode, antialias=True)
        if torch.rand((), generator=g) < 0.5:
            crop = crop.flip(-1)
        crops[i] = crop
    mean_t = torch.tensor(tuple(mean)).view(3, 1, 1)
    std_t = torch.tensor(tuple(std)).view(3, 1, 1)

    def normalize(image: torch.Tensor) -> torch.Tensor:
        return scale_and_normalize(image, max_value=255.0, mean=mean_t, std=std_t)

    full = TensorImageDataset(crops, torch.full((num_images,), -1), transform=normalize)
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = min(max(1, round(val_fraction * num_images)), num_images - 1)
    return EvalData(
        name="photo_crops",
        num_classes=num_classes,
        image_size=image_size,
        channels=3,
        mean=tuple(mean),
        std=tuple(std),
        val=full.subset(order[:n_val]),
        test=full.subset(order[n_val:]),
        labelled_by="teacher",
    )
