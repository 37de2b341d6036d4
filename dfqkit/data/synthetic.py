"""Random images standing in for an evaluation set: for speed benchmarks, never for accuracy."""

from __future__ import annotations

import torch

from dfqkit.data.eval_data import EvalData, data_factory


@data_factory
def synthetic(*, num_classes: int, image_size: int, channels: int, size: int = 8) -> EvalData:
    """``size`` Gaussian-noise images with cyclic labels as both val and test split.

    Args:
        num_classes, image_size, channels: the shape a teacher expects.
        size: images per split.
    """
    images = torch.randn(size, channels, image_size, image_size)
    labels = torch.arange(size) % num_classes
    ds = torch.utils.data.TensorDataset(images, labels)
    return EvalData(
        name="synthetic",
        num_classes=num_classes,
        image_size=image_size,
        channels=channels,
        mean=(0.0,) * channels,
        std=(1.0,) * channels,
        val=ds,
        test=ds,
    )
