import numpy as np
import pytest
from PIL import Image

from dfqkit.data import timm_data_config, timm_imagenet_folder


def test_data_config_comes_from_the_model():
    deit = timm_data_config("deit_tiny_patch16_224")
    assert deit == {
        "image_size": 224,
        "resize": 248,  # 224 / crop_pct 0.9
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "interpolation": "bicubic",
    }
    augreg = timm_data_config("vit_base_patch16_224.augreg_in21k_ft_in1k")
    assert augreg["mean"] == (0.5, 0.5, 0.5) and augreg["std"] == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="is not a timm model"):
        timm_data_config("deit_tinny")


def test_folder_uses_the_models_transform(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.full((30, 50, 3), 255, np.uint8)).save(tmp_path / cls / "0.png")
    data = timm_imagenet_folder(
        root=str(tmp_path), model="vit_base_patch16_224.augreg_in21k_ft_in1k"
    )
    image, label = data.test[0]
    assert image.shape == (3, 224, 224) and label == 0
    assert data.mean == (0.5, 0.5, 0.5)
    assert image.min().item() == pytest.approx(1.0)  # white: (1 - 0.5) / 0.5
