import torch
from torch import nn

from dfqkit.models import cifar_resnet20
from dfqkit.registry import get


def _pytorchcv_keys(num_classes: int) -> list[str]:
    """pytorchcv resnet20_cifar* state-dict keys, written out from its naming scheme."""

    def block(prefix: str) -> list[str]:
        bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
        return [f"{prefix}.conv.weight"] + [f"{prefix}.bn.{b}" for b in bn]

    keys = block("features.init_block")
    for stage in (1, 2, 3):
        for unit in (1, 2, 3):
            p = f"features.stage{stage}.unit{unit}"
            keys += block(f"{p}.body.conv1") + block(f"{p}.body.conv2")
            if unit == 1 and stage > 1:
                keys += block(f"{p}.identity_conv")
    return keys + ["output.weight", "output.bias"]


def test_state_dict_keys_are_pytorchcv_s():
    model = cifar_resnet20(num_classes=10)
    assert list(model.state_dict()) == _pytorchcv_keys(10)
    assert model.state_dict()["output.weight"].shape == (10, 64)
    assert isinstance(model.features.final_pool, nn.AvgPool2d)
    assert get("models", "cifar_resnet20") is cifar_resnet20


def test_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(cifar_resnet20(num_classes=10)) == 272_474
    assert count(cifar_resnet20()) == 278_324  # default: CIFAR-100


def test_checkpoint_round_trip_and_eval_mode(tmp_path):
    torch.manual_seed(0)
    model = cifar_resnet20(num_classes=100)
    with torch.no_grad():  # non-trivial BN statistics
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.uniform_(-0.1, 0.1)
    state = {k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    torch.save({"state_dict": state}, tmp_path / "resnet20_cifar100.pth")  # old-style file
    loaded = cifar_resnet20(num_classes=100, weights=str(tmp_path / "resnet20_cifar100.pth"))
    assert not loaded.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert loaded(x).shape == (2, 100)


def test_every_relu_is_a_module_called_exactly_once():
    model = cifar_resnet20(num_classes=10)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 19  # stem + 9 units x (body.conv1 + after the add)
    calls = {id(m): 0 for m in relus}
    for m in relus:
        m.register_forward_hook(lambda mod, i, o: calls.__setitem__(id(mod), calls[id(mod)] + 1))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert set(calls.values()) == {1}
