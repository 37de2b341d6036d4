import pytest
import timm
import torch
from safetensors.torch import save_file

from dfqkit.models import timm_model, torchvision_model
from dfqkit.registry import get


def test_unknown_names_suggest_close_matches():
    with pytest.raises(ValueError, match="not a torchvision classification model.*'resnet18'"):
        torchvision_model(name="resnet81")
    with pytest.raises(ValueError, match="not a timm model.*'resnet18'"):
        timm_model(name="resnt18")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_checkpoint_round_trip(tmp_path, suffix):
    torch.manual_seed(0)
    source = timm.create_model("test_vit", pretrained=False, num_classes=7).eval()
    path = tmp_path / f"vit{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": source.state_dict()}, path)
    else:
        save_file(source.state_dict(), str(path))
    model = timm_model(name="test_vit", num_classes=7, weights=str(path))
    x = torch.randn(2, *source.pretrained_cfg["input_size"])
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_timm_wrong_architecture(tmp_path):
    save_file(timm.create_model("test_vit").state_dict(), str(tmp_path / "vit.safetensors"))
    with pytest.raises(ValueError, match="does not fit model ResNet"):
        timm_model(name="test_resnet", weights=str(tmp_path / "vit.safetensors"))


def test_registered_and_random_init_without_download():
    assert get("models", "timm_model") is timm_model
    assert get("models", "torchvision_model") is torchvision_model
    model = torchvision_model(name="squeezenet1_0", num_classes=4)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    assert timm_model(name="test_resnet").num_classes == 1000
