"""The architectures the PTQ papers report beyond torchvision's builders (RegNetX-600MF,
MnasNet-2.0), InceptionV3 without its auxiliary head, and checkpoints in pycls's RegNet layout."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models.regnet import BlockParams, RegNet

from dfqkit.models import torchvision_model
from dfqkit.models.torchvision_model import pycls_regnet_to_torchvision


def _stages(model: RegNet) -> tuple[list[int], list[int], list[int]]:
    widths, depths, groups = [], [], []
    for stage in model.trunk_output:
        blocks = list(stage)
        depths.append(len(blocks))
        widths.append(blocks[0].f.c[0].out_channels)
        groups.append(blocks[0].f.b[0].groups)
    return widths, depths, groups


def test_regnet_x_600mf_has_the_pycls_stages():
    # RegNetX-600MF in the RegNet paper / pycls model zoo: widths 48/96/240/528, depths
    # 1/3/5/7, group width 24 (so 2/4/10/22 groups), stem 32.
    model = torchvision_model(name="regnet_x_600mf", num_classes=10)
    widths, depths, groups = _stages(model)
    assert widths == [48, 96, 240, 528] and depths == [1, 3, 5, 7]
    assert groups == [w // 24 for w in widths]
    assert model.stem[0].out_channels == 32 and model.fc.out_features == 10


def test_mnasnet2_0_widths_and_safetensors_weights_load(tmp_path):
    torch.manual_seed(0)
    model = torchvision_model(name="mnasnet2_0", num_classes=5)
    assert model.layers[0].out_channels == 64  # 32 × 2.0: the version-2 stem scales with alpha
    assert model.classifier[1].in_features == 1280
    # safetensors keeps no per-module versions; torchvision's MNASNet refuses a state dict
    # without them unless the loader supplies the current one
    path = tmp_path / "mnas.safetensors"
    save_file(model.state_dict(), path)
    loaded = torchvision_model(name="mnasnet2_0", num_classes=5, weights=str(path))
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded(x), model(x))


def test_inception_v3_without_aux_head_loads_a_full_checkpoint(tmp_path):
    torch.manual_seed(0)
    full = torchvision_model(name="inception_v3", num_classes=3, kwargs={"init_weights": False})
    assert full.AuxLogits is not None
    path = tmp_path / "inc.pth"
    torch.save(full.state_dict(), path)
    kwargs = {"transform_input": True, "aux_logits": False, "init_weights": False}
    model = torchvision_model(name="inception_v3", num_classes=3, weights=str(path), kwargs=kwargs)
    assert model.AuxLogits is None and model.transform_input
    x = torch.randn(1, 3, 80, 80)
    # transform_input maps ImageNet-normalised input to (x - 0.5) / 0.5 per channel
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    moved = (x * std[:, None, None] + mean[:, None, None] - 0.5) / 0.5
    assert torch.allclose(model(x), full(moved), atol=1e-5)


def test_bad_kwargs_and_hub_for_extra_architectures_name_the_field():
    with pytest.raises(ValueError, match="kwargs=.*num_classes"):
        torchvision_model(name="resnet18", kwargs={"num_classes": 3})
    with pytest.raises(ValueError, match="kwargs=.*'depth_multiplier'.*resnet18"):
        torchvision_model(name="resnet18", kwargs={"depth_multiplier": 3})
    with pytest.raises(ValueError, match="weights='hub'.*regnet_x_600mf"):
        torchvision_model(name="regnet_x_600mf", weights="hub")
    with pytest.raises(ValueError, match="'s1.b1.g.a.weight'"):
        pycls_regnet_to_torchvision({"s1.b1.g.a.weight": torch.zeros(1)})


# An independent pycls-layout RegNet (the layout of pycls's and BRECQ's checkpoints), written
# from the RegNet paper's description: stem conv 3×3/2 + BN + ReLU; stages ``s{i}`` of blocks
# ``b{j}``: a bottleneck ``f`` (1×1 ``a``, grouped 3×3/stride ``b``, 1×1 ``c``, each with BN)
# plus an identity or a 1×1/stride projection ``proj`` + ``bn``, then ReLU; head avg-pool + fc.
class _Block(nn.Module):
    def __init__(self, w_in, w_out, stride, group_width):
        super().__init__()
        if w_in != w_out or stride != 1:
            self.proj = nn.Conv2d(w_in, w_out, 1, stride, bias=False)
            self.bn = nn.BatchNorm2d(w_out)
        self.f = nn.Module()
        self.f.a, self.f.a_bn = nn.Conv2d(w_in, w_out, 1, bias=False), nn.BatchNorm2d(w_out)
        groups = w_out // group_width
        self.f.b = nn.Conv2d(w_out, w_out, 3, stride, 1, groups=groups, bias=False)
        self.f.b_bn = nn.BatchNorm2d(w_out)
        self.f.c, self.f.c_bn = nn.Conv2d(w_out, w_out, 1, bias=False), nn.BatchNorm2d(w_out)

    def forward(self, x):
        f = self.f
        y = torch.relu(f.a_bn(f.a(x)))
        y = torch.relu(f.b_bn(f.b(y)))
        y = f.c_bn(f.c(y))
        skip = self.bn(self.proj(x)) if hasattr(self, "proj") else x
        return torch.relu(skip + y)


class _PyclsRegNet(nn.Module):
    def __init__(self, widths, depths, group_width, num_classes):
        super().__init__()
        self.stem = nn.Module()
        self.stem.conv = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self.stem.bn = nn.BatchNorm2d(32)
        w_in = 32
        self.stages = []
        for i, (w, d) in enumerate(zip(widths, depths), start=1):
            stage = nn.Module()
            for j in range(1, d + 1):
                stage.add_module(f"b{j}", _Block(w_in if j == 1 else w, w, 2 if j == 1 else 1,
                                                 group_width))  # fmt: skip
            self.add_module(f"s{i}", stage)
            self.stages.append(stage)
            w_in = w
        self.head = nn.Module()
        self.head.fc = nn.Linear(w_in, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem.bn(self.stem.conv(x)))
        for stage in self.stages:
            for block in stage.children():
                x = block(x)
        return self.head.fc(x.mean((2, 3)))


def test_pycls_regnet_checkpoint_loads_and_computes_the_same_function(tmp_path):
    torch.manual_seed(0)
    pycls = _PyclsRegNet([16, 32], [1, 2], group_width=8, num_classes=4).eval()
    for m in pycls.modules():  # non-trivial BN statistics, so a mis-mapped BN changes the output
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    path = tmp_path / "regnet_pycls.pth"
    torch.save(pycls.state_dict(), path)
    converted = pycls_regnet_to_torchvision(torch.load(path, weights_only=True))
    params = BlockParams([1, 2], [16, 32], [8, 8], [1.0, 1.0], [2, 2])
    model = RegNet(params, num_classes=4).eval()
    assert set(converted) == set(model.state_dict())
    # and through the loader, which recognises the layout by its ``stem.conv`` key
    from dfqkit.models.torchvision_model import _adapt
    from dfqkit.models.weights import load_weights

    load_weights(model, path, adapt=_adapt)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), pycls(x), atol=1e-5)
