"""Crops of scikit-learn's photos: deterministic, split, normalized on access, teacher-labelled."""

import pytest
import torch

from dfqkit.data import photo_crops


def test_crops_are_the_same_for_a_seed_split_and_normalized_on_access():
    a = photo_crops(num_classes=5, num_images=10, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    b = photo_crops(num_classes=5, num_images=10, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    other = photo_crops(num_classes=5, num_images=10, image_size=32, seed=1)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.val.images, other.val.images)
    assert (len(a.val), len(a.test)) == (5, 5) and a.labelled_by == "teacher"
    assert a.val.images.dtype == torch.uint8 and a.val.images.shape[1:] == (3, 32, 32)
    image, label = a.val[0]
    raw = a.val.images[0].float() / 255
    assert torch.allclose(image, (raw - 0.5) / 0.25) and label == -1  # labelled by the run
    # real photographs, not noise: neighbouring pixels are strongly correlated
    x = a.val.images.float()
    corr = torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1]
    assert corr > 0.8


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_images must be an integer >= 2, got 1"):
        photo_crops(num_classes=5, num_images=1)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        photo_crops(num_classes=5, val_fraction=1.0)
    with pytest.raises(ValueError, match="scale"):
        photo_crops(num_classes=5, scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="interpolation must be one of"):
        photo_crops(num_classes=5, interpolation="lanczos")
