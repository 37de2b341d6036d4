import gin
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dfqkit.models import mnist_resnet


def test_shapes_depth_and_relu_modules():
    model = mnist_resnet(weights=None)
    assert not model.training
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 7  # stem + 3 units x 2
    calls = []
    for m in relus:
        m.register_forward_hook(lambda mod, i, o: calls.append(id(mod)))
    model(torch.randn(1, 1, 28, 28))
    assert sorted(calls) == sorted(id(m) for m in relus)
    deeper = mnist_resnet(depth=14, width=8, num_classes=5, in_channels=3, weights=None)
    assert deeper(torch.randn(2, 3, 28, 28)).shape == (2, 5)
    assert (
        len(deeper.features.stage2) == 2
        and deeper.features.stage3.unit1.body.conv1.conv.out_channels == 32
    )


@pytest.mark.parametrize("depth", [6, 9, 0])
def test_bad_depth(depth):
    with pytest.raises(ValueError, match=f"depth must be 8, 14, 20, .*got {depth}"):
        mnist_resnet(depth=depth, weights=None)


def test_zoo_weights_missing_says_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DFQKIT_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m dfqkit.zoo train mnist_resnet8"):
        mnist_resnet()


def test_zoo_weights_load_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DFQKIT_CACHE", str(tmp_path))
    torch.manual_seed(1)
    source = mnist_resnet(weights=None)
    (tmp_path / "zoo").mkdir()
    save_file(source.state_dict(), str(tmp_path / "zoo" / "mnist_resnet8.safetensors"))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(mnist_resnet()(x), source(x))


def test_zoo_weights_only_for_the_zoo_architecture():
    with pytest.raises(ValueError, match="weights='zoo' holds mnist_resnet8"):
        mnist_resnet(width=8)


@gin.configurable("consume_teacher", module="dfqkit_tests")
def consume_teacher(teacher: nn.Module | None = None) -> nn.Module | None:
    return teacher


def test_gin_builds_it():
    gin.parse_config(
        "dfqkit_tests.consume_teacher.teacher = @models.mnist_resnet()\n"
        "models.mnist_resnet.weights = None"
    )
    assert isinstance(consume_teacher(), nn.Module)
