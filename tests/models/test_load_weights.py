import pytest
import torch
import torchvision
from safetensors.torch import save_file

from dfqkit.models import load_weights, torchvision_model


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_checkpoint_round_trip(tmp_path, resnet18, suffix):
    path = tmp_path / f"r18{suffix}"
    state = resnet18.state_dict()
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    model = torchvision_model(name="resnet18", num_classes=10, weights=str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), resnet18(x))
    assert not model.training


def test_nested_and_prefixed_checkpoints_unwrap(tmp_path, resnet18):
    ddp = {f"module.{k}": v for k, v in resnet18.state_dict().items()}
    torch.save({"epoch": 3, "model": ddp, "best_acc1": torch.tensor(0.5)}, tmp_path / "c.pth")
    model = load_weights(torchvision.models.resnet18(num_classes=10), tmp_path / "c.pth")
    assert torch.equal(model.fc.weight, resnet18.fc.weight)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_weights(torch.nn.Linear(2, 2), str(tmp_path / "nope.pth"))


def test_wrong_architecture_lists_keys(tmp_path, resnet18):
    torch.save(resnet18.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(
        ValueError, match=r"does not fit model MobileNetV2: .*missing keys \(features"
    ):
        torchvision_model(name="mobilenet_v2", num_classes=10, weights=str(tmp_path / "r18.pth"))
    with pytest.raises(ValueError, match=r"shape mismatches \(fc.weight: checkpoint \(10, 512\)"):
        torchvision_model(name="resnet18", num_classes=100, weights=str(tmp_path / "r18.pth"))


def test_non_strict_tolerates_missing_keys(tmp_path):
    torch.manual_seed(0)
    source = torch.nn.Sequential(torch.nn.Linear(2, 3))
    save_file({"0.weight": source[0].weight.detach()}, str(tmp_path / "w.safetensors"))
    target = torch.nn.Sequential(torch.nn.Linear(2, 3))
    with pytest.raises(ValueError, match=r"1 missing keys \(0.bias\)"):
        load_weights(target, tmp_path / "w.safetensors")
    load_weights(target, tmp_path / "w.safetensors", strict=False)
    assert torch.equal(target[0].weight, source[0].weight)


def test_pickled_code_is_refused(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a whole pickled module
    with pytest.raises(ValueError, match=r"torch.nn.modules.linear.Linear\): refused, since"):
        load_weights(torch.nn.Linear(2, 2), tmp_path / "module.pth")
