"""key_map="order": a foreign state dict mapped onto a model's keys by position."""

from collections import OrderedDict

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from dfqkit.models import load_weights, timm_model
from dfqkit.models.order_keys import map_by_order


class Foreign(nn.Module):
    """The target's network under another code base's names (as lukemelas's EfficientNet)."""

    def __init__(self, out: int = 3, extra: bool = False):
        super().__init__()
        self._conv_stem = nn.Conv2d(2, out, 3, bias=False)
        self._bn0 = nn.BatchNorm2d(out)
        self._fc = nn.Linear(out, 5)
        self._extra = nn.Linear(5, 5) if extra else None


def target() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, bias=False),
        nn.BatchNorm2d(3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 5),
    ).eval()


@pytest.fixture()
def foreign():
    torch.manual_seed(0)
    net = Foreign()
    for tensor in net.state_dict().values():
        if tensor.is_floating_point():
            tensor.copy_(torch.rand_like(tensor) + 0.5)  # running_var > 0
    net._bn0.num_batches_tracked.fill_(7)
    return net


def test_maps_by_order_and_computes_the_same_function(tmp_path, foreign):
    torch.save(foreign.state_dict(), tmp_path / "f.pth")
    model = load_weights(target(), tmp_path / "f.pth", key_map="order")
    x = torch.randn(2, 2, 6, 6)
    stem, bn, fc = foreign._conv_stem, foreign._bn0.eval(), foreign._fc
    with torch.no_grad():
        torch.testing.assert_close(model(x), fc(bn(stem(x)).mean((2, 3))))
    assert torch.equal(model[1].running_var, foreign._bn0.running_var)
    # num_batches_tracked takes no part in the pairing: the model keeps its own counter
    assert int(model[1].num_batches_tracked) == 0


def test_files_without_counters_load_too(tmp_path, foreign):
    state = {k: v for k, v in foreign.state_dict().items() if "num_batches" not in k}
    torch.save(state, tmp_path / "f.pth")
    model = load_weights(target(), tmp_path / "f.pth", key_map="order")
    assert torch.equal(model[4].bias, foreign._fc.bias)


def test_shape_mismatch_names_index_both_keys_and_shapes(tmp_path):
    torch.save(Foreign(out=4).state_dict(), tmp_path / "f.pth")
    with pytest.raises(ValueError) as err:
        load_weights(target(), tmp_path / "f.pth", key_map="order")
    text = str(err.value)
    assert "f.pth" in text and "shapes differ at tensor 0" in text
    assert "checkpoint '_conv_stem.weight' (4, 2, 3, 3) vs model '0.weight' (3, 2, 3, 3)" in text


def test_count_mismatch_gives_both_counts(tmp_path):
    torch.save(Foreign(extra=True).state_dict(), tmp_path / "f.pth")
    with pytest.raises(ValueError, match=r"checkpoint has 9 tensors and model Sequential 7"):
        load_weights(target(), tmp_path / "f.pth", key_map="order")


def test_count_mismatch_points_at_the_first_shape_mismatch():
    state = OrderedDict(Foreign(out=4, extra=True).state_dict())
    with pytest.raises(ValueError, match=r"first shape mismatch is tensor 0: checkpoint"):
        map_by_order(target(), state)


def test_same_shapes_in_another_order_are_refused_by_name(foreign):
    state = OrderedDict(foreign.state_dict())
    swapped = OrderedDict()
    for key in state:  # the BN's bias before its weight: same shapes, other order
        key = {"_bn0.weight": "_bn0.bias", "_bn0.bias": "_bn0.weight"}.get(key, key)
        swapped[key] = state[key]
    with pytest.raises(ValueError, match=r"names differ at tensor 1: checkpoint '_bn0.bias'"):
        map_by_order(target(), swapped)


def test_foreign_leaf_names_outside_torchs_are_paired_by_shape(foreign):
    state = OrderedDict((k.replace("weight", "kernel"), v) for k, v in foreign.state_dict().items())
    out = map_by_order(target(), state)
    assert list(out) == [k for k in target().state_dict() if "num_batches" not in k]


def test_refuses_safetensors_and_unknown_key_maps(tmp_path, foreign):
    save_file(foreign.state_dict(), str(tmp_path / "f.safetensors"))
    with pytest.raises(ValueError, match="saving order is lost"):
        load_weights(target(), tmp_path / "f.safetensors", key_map="order")
    with pytest.raises(ValueError, match=r"key_map='index' is not one of \('name', 'order'\)"):
        load_weights(target(), tmp_path / "f.safetensors", key_map="index")


def test_timm_factory_loads_a_renamed_file_by_order(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("test_resnet").eval()
    renamed = OrderedDict((f"foreign.{i}.{k.rsplit('.', 1)[-1]}", v)
                          for i, (k, v) in enumerate(source.state_dict().items()))  # fmt: skip
    torch.save(renamed, tmp_path / "r.pth")
    with pytest.raises(ValueError, match="missing keys"):
        timm_model(name="test_resnet", weights=str(tmp_path / "r.pth"))
    model = timm_model(name="test_resnet", weights=str(tmp_path / "r.pth"), key_map="order")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
