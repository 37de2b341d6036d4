import pytest
import torch

from dfqkit.models.fit_teacher import TrainRecipe, random_affine


def test_no_warp_is_identity():
    x = torch.randn(4, 2, 9, 7)
    out = random_affine(
        x, torch.Generator().manual_seed(0), max_shift=0, max_rotation=0, max_scale=0
    )
    assert torch.allclose(out, x, atol=1e-5)


def test_shift_moves_each_image_by_whole_pixels():
    x = torch.randn(16, 1, 12, 12)
    out = random_affine(
        x, torch.Generator().manual_seed(1), max_shift=2, max_rotation=0, max_scale=0
    )
    offsets = set()
    for i in range(16):
        found = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.allclose(
                out[i, 0, 2:-2, 2:-2], x[i, 0, 2 + dy : 10 + dy, 2 + dx : 10 + dx], atol=1e-4
            )
        ]
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) > 3  # per-image offsets, not one per batch


def test_same_generator_seed_same_warp():
    x = torch.randn(3, 1, 8, 8)
    a, b = (
        random_affine(
            x, torch.Generator().manual_seed(5), max_shift=2, max_rotation=12, max_scale=0.1
        )
        for _ in range(2)
    )
    assert torch.equal(a, b)


def test_recipe_validates_fields():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainRecipe(optimizer="lbfgs")
    with pytest.raises(ValueError, match="epochs must be positive, got 0"):
        TrainRecipe(epochs=0)
    with pytest.raises(ValueError, match="max_rotation must be >= 0"):
        TrainRecipe(max_rotation=-1)
