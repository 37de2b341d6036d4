"""pytorchcv's ImageNet ResNet, MobileNetV2 and InceptionV3 checkpoints load into torchvision's
models (with ``stride_in_1x1`` / ``first_expand_conv`` where pytorchcv's variant differs).

pytorchcv is not a dependency: its layouts are re-written here from its source (``resnet.py``,
``mobilenetv2.py``, ``inceptionv3.py`` of pytorchcv 0.0.74), independently of the renaming code.
"""

import pytest
import torch
from torch import nn

from dfqkit.models import torchvision_model
from dfqkit.models.pytorchcv_keys import (
    pytorchcv_inceptionv3_to_torchvision,
    pytorchcv_mobilenetv2_to_torchvision,
    pytorchcv_resnet_to_torchvision,
)


class _ConvBlock(nn.Module):  # pytorchcv's ConvBlock: conv (no bias), BN, optional activation
    def __init__(self, c_in, c_out, k, stride=1, groups=1, activ=nn.ReLU):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.activ = activ() if activ else nn.Identity()

    def forward(self, x):
        return self.activ(self.bn(self.conv(x)))


class _ResUnit(nn.Module):
    def __init__(self, c_in, c_out, stride, bottleneck, conv1_stride):
        super().__init__()
        self.body = nn.Module()
        if bottleneck:
            mid = c_out // 4
            self.body.conv1 = _ConvBlock(c_in, mid, 1, stride if conv1_stride else 1)
            self.body.conv2 = _ConvBlock(mid, mid, 3, 1 if conv1_stride else stride)
            self.body.conv3 = _ConvBlock(mid, c_out, 1, activ=None)
        else:
            self.body.conv1 = _ConvBlock(c_in, c_out, 3, stride)
            self.body.conv2 = _ConvBlock(c_out, c_out, 3, activ=None)
        if c_in != c_out or stride != 1:
            self.identity_conv = _ConvBlock(c_in, c_out, 1, stride, activ=None)

    def forward(self, x):
        skip = self.identity_conv(x) if hasattr(self, "identity_conv") else x
        for conv in self.body.children():
            x = conv(x)
        return torch.relu(x + skip)


class _PytorchcvResNet(nn.Module):
    def __init__(self, layers, bottleneck, conv1_stride):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("init_block", nn.Sequential())
        self.features.init_block.add_module("conv", _ConvBlock(3, 64, 7, 2))
        self.features.init_block.add_module("pool", nn.MaxPool2d(3, 2, 1))
        c_in = 64
        for i, n in enumerate(layers):
            c_out = 64 * 2**i * (4 if bottleneck else 1)
            stage = nn.Sequential()
            for j in range(n):
                stride = 2 if j == 0 and i > 0 else 1
                unit = _ResUnit(c_in, c_out, stride, bottleneck, conv1_stride)
                stage.add_module(f"unit{j + 1}", unit)
                c_in = c_out
            self.features.add_module(f"stage{i + 1}", stage)
        self.output = nn.Linear(c_in, 1000)

    def forward(self, x):
        return self.output(self.features(x).mean((2, 3)))  # AvgPool2d(7) at 224 px


class _LinearBottleneck(nn.Module):
    def __init__(self, c_in, c_out, stride, exp_conv):
        super().__init__()
        mid = c_in * 6 if exp_conv == "x6" else c_in
        self.residual = c_in == c_out and stride == 1
        if exp_conv:
            self.conv1 = _ConvBlock(c_in, mid, 1, activ=nn.ReLU6)
        self.conv2 = _ConvBlock(mid, mid, 3, stride, groups=mid, activ=nn.ReLU6)
        self.conv3 = _ConvBlock(mid, c_out, 1, activ=None)

    def forward(self, x):
        y = self.conv1(x) if hasattr(self, "conv1") else x
        y = self.conv3(self.conv2(y))
        return x + y if self.residual else y


class _PytorchcvMobileNetV2(nn.Module):
    STAGES = ([16], [24] * 2, [32] * 3, [64] * 4 + [96] * 3, [160] * 3 + [320])

    def __init__(self, remove_exp_conv):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("init_block", _ConvBlock(3, 32, 3, 2, activ=nn.ReLU6))
        c_in = 32
        for i, widths in enumerate(self.STAGES):
            stage = nn.Sequential()
            for j, c_out in enumerate(widths):
                first = i == 0 and j == 0  # no expansion (ratio 1): a 32 -> 32 conv, or none
                exp_conv = ("" if remove_exp_conv else "x1") if first else "x6"
                stride = 2 if j == 0 and i > 0 else 1
                stage.add_module(f"unit{j + 1}", _LinearBottleneck(c_in, c_out, stride, exp_conv))
                c_in = c_out
            self.features.add_module(f"stage{i + 1}", stage)
        self.features.add_module("final_block", _ConvBlock(c_in, 1280, 1, activ=nn.ReLU6))
        self.output = nn.Conv2d(1280, 1000, 1, bias=False)

    def forward(self, x):
        x = self.features(x).mean((2, 3), keepdim=True)  # AvgPool2d(7) at 224 px
        return self.output(x).flatten(1)


def _randomise(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):  # activations stay O(1), so a wrong stride shows
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.double().eval()


def _outputs(reference, name, kwargs, path):
    torch.save(reference.state_dict(), path)
    model = torchvision_model(name=name, weights=str(path), kwargs=kwargs).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        return reference(x), model(x)


@pytest.mark.parametrize(
    "layers, bottleneck, conv1_stride, name, kwargs",
    [
        ([2, 2, 2, 2], False, True, "resnet18", {}),
        ([3, 4, 6, 3], True, True, "resnet50", {"stride_in_1x1": True}),  # pytorchcv resnet50
        ([3, 4, 6, 3], True, False, "resnet50", {"stride_in_1x1": False}),  # resnet50b
    ],
)
def test_pytorchcv_resnet_computes_the_same_function(
    tmp_path, layers, bottleneck, conv1_stride, name, kwargs
):
    reference = _randomise(_PytorchcvResNet(layers, bottleneck, conv1_stride))
    expected, got = _outputs(reference, name, kwargs, tmp_path / "resnet.pth")
    assert expected.std() > 1e-2
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-9 * expected.abs().max())
    if bottleneck:  # the other stride placement is another function
        flipped = {"stride_in_1x1": not kwargs["stride_in_1x1"]}
        _, other = _outputs(reference, name, flipped, tmp_path / "resnet.pth")
        assert not torch.allclose(other, expected, atol=1e-3 * expected.abs().max())


@pytest.mark.parametrize("remove_exp_conv", [False, True])  # mobilenetv2_w1, mobilenetv2b_w1
def test_pytorchcv_mobilenetv2_computes_the_same_function(tmp_path, remove_exp_conv):
    reference = _randomise(_PytorchcvMobileNetV2(remove_exp_conv))
    kwargs = {} if remove_exp_conv else {"first_expand_conv": True}
    expected, got = _outputs(reference, "mobilenet_v2", kwargs, tmp_path / "mbv2.pth")
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-9 * expected.abs().max())
    # pytorchcv's _test asserts 3,504,960 / 3,503,872 parameters: its classifier has no bias
    model = torchvision_model(name="mobilenet_v2", kwargs=kwargs)
    params = sum(p.numel() for p in model.parameters()) - model.classifier[1].bias.numel()
    assert params == (3_503_872 if remove_exp_conv else 3_504_960)


def test_pytorchcv_key_pairs_and_counts():
    resnet = _PytorchcvResNet([2, 2, 2, 2], False, True).state_dict()
    converted = pytorchcv_resnet_to_torchvision(resnet)
    pairs = {
        "features.init_block.conv.conv.weight": "conv1.weight",
        "features.init_block.conv.bn.running_var": "bn1.running_var",
        "features.stage1.unit2.body.conv2.bn.bias": "layer1.1.bn2.bias",
        "features.stage3.unit1.identity_conv.conv.weight": "layer3.0.downsample.0.weight",
        "features.stage4.unit1.identity_conv.bn.running_mean": "layer4.0.downsample.1.running_mean",
        "output.weight": "fc.weight",
    }  # fmt: skip
    assert all(converted[tv] is resnet[cv] for cv, tv in pairs.items())
    assert len(converted) == len(resnet) == 122
    mbv2 = _PytorchcvMobileNetV2(remove_exp_conv=False).state_dict()
    converted = pytorchcv_mobilenetv2_to_torchvision(mbv2)
    pairs = {
        "features.init_block.bn.weight": "features.0.1.weight",
        "features.stage1.unit1.conv1.conv.weight": "features.1.conv.0.0.weight",
        "features.stage1.unit1.conv3.bn.running_mean": "features.1.conv.3.running_mean",
        "features.stage2.unit2.conv2.bn.bias": "features.3.conv.1.1.bias",
        "features.stage4.unit7.conv3.conv.weight": "features.13.conv.2.weight",
        "features.stage5.unit4.conv1.bn.running_var": "features.17.conv.0.1.running_var",
        "features.final_block.conv.weight": "features.18.0.weight",
    }  # fmt: skip
    assert all(converted[tv] is mbv2[cv] for cv, tv in pairs.items())
    assert converted["classifier.1.weight"].shape == (1000, 1280)
    assert not converted["classifier.1.bias"].any()
    assert len(converted) == len(mbv2) + 1 == 320  # + the zero bias


def _block(state, prefix, c_out, c_in, kh, kw=None):  # pytorchcv's ConvBlock keys
    state[f"{prefix}.conv.weight"] = torch.randn(c_out, c_in, kh, kw or kh)
    for name in ("weight", "bias", "running_mean", "running_var"):
        state[f"{prefix}.bn.{name}"] = torch.randn(c_out)
    state[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(0)


def _pytorchcv_inceptionv3_state():
    # from pytorchcv's inceptionv3.py: InceptInitBlock, InceptionA/B/CUnit, ReductionA/BUnit
    s = {}
    stem = ((32, 3, 3), (32, 32, 3), (64, 32, 3), (80, 64, 1), (192, 80, 3))
    for i, shape in enumerate(stem, start=1):
        _block(s, f"features.init_block.conv{i}", *shape)
    for u, (c_in, pool) in enumerate(((192, 32), (256, 64), (288, 64)), start=1):
        p = f"features.stage1.unit{u}.branches."
        _block(s, p + "branch1.conv", 64, c_in, 1)
        _block(s, p + "branch2.conv_list.conv1", 48, c_in, 1)
        _block(s, p + "branch2.conv_list.conv2", 64, 48, 5)
        _block(s, p + "branch3.conv_list.conv1", 64, c_in, 1)
        _block(s, p + "branch3.conv_list.conv2", 96, 64, 3)
        _block(s, p + "branch3.conv_list.conv3", 96, 96, 3)
        _block(s, p + "branch4.conv", pool, c_in, 1)
    p = "features.stage2.unit1.branches."
    _block(s, p + "branch1.conv_list.conv1", 384, 288, 3)
    _block(s, p + "branch2.conv_list.conv1", 64, 288, 1)
    _block(s, p + "branch2.conv_list.conv2", 96, 64, 3)
    _block(s, p + "branch2.conv_list.conv3", 96, 96, 3)
    for u, mid in enumerate((128, 160, 160, 192), start=2):
        p = f"features.stage2.unit{u}.branches."
        _block(s, p + "branch1.conv", 192, 768, 1)
        _block(s, p + "branch2.conv_list.conv1", mid, 768, 1)
        _block(s, p + "branch2.conv_list.conv2", mid, mid, 1, 7)
        _block(s, p + "branch2.conv_list.conv3", 192, mid, 7, 1)
        _block(s, p + "branch3.conv_list.conv1", mid, 768, 1)
        for i, (kh, kw) in enumerate(((7, 1), (1, 7), (7, 1), (1, 7)), start=2):
            _block(s, p + f"branch3.conv_list.conv{i}", 192 if i == 5 else mid, mid, kh, kw)
        _block(s, p + "branch4.conv", 192, 768, 1)
    p = "features.stage3.unit1.branches."
    _block(s, p + "branch1.conv_list.conv1", 192, 768, 1)
    _block(s, p + "branch1.conv_list.conv2", 320, 192, 3)
    _block(s, p + "branch2.conv_list.conv1", 192, 768, 1)
    _block(s, p + "branch2.conv_list.conv2", 192, 192, 1, 7)
    _block(s, p + "branch2.conv_list.conv3", 192, 192, 7, 1)
    _block(s, p + "branch2.conv_list.conv4", 192, 192, 3)
    for u, c_in in enumerate((1280, 2048), start=2):
        p = f"features.stage3.unit{u}.branches."
        _block(s, p + "branch1.conv", 320, c_in, 1)
        _block(s, p + "branch2.conv_list.conv1", 384, c_in, 1)
        _block(s, p + "branch3.conv_list.conv1", 448, c_in, 1)
        _block(s, p + "branch3.conv_list.conv2", 384, 448, 3)
        for b in ("branch2", "branch3"):
            _block(s, p + f"{b}.conv1x3", 384, 384, 1, 3)
            _block(s, p + f"{b}.conv3x1", 384, 384, 3, 1)
        _block(s, p + "branch4.conv", 192, c_in, 1)
    s["output.fc.weight"], s["output.fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    return s


def test_pytorchcv_inceptionv3_keys_fill_torchvision_one_to_one(tmp_path):
    state = _pytorchcv_inceptionv3_state()
    converted = pytorchcv_inceptionv3_to_torchvision(state)
    kwargs = {"aux_logits": False, "transform_input": False, "init_weights": False}
    model = torchvision_model(name="inception_v3", kwargs=kwargs)
    expected = model.state_dict()
    assert len(state) == len(converted) == len(expected) == 566  # 94 conv blocks × 6 + fc
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in expected.items()}
    pairs = {
        "features.init_block.conv3.conv.weight": "Conv2d_2b_3x3.conv.weight",
        "features.stage1.unit3.branches.branch4.conv.bn.bias": "Mixed_5d.branch_pool.bn.bias",
        "features.stage2.unit1.branches.branch1.conv_list.conv1.conv.weight":
            "Mixed_6a.branch3x3.conv.weight",
        "features.stage2.unit5.branches.branch3.conv_list.conv4.bn.running_var":
            "Mixed_6e.branch7x7dbl_4.bn.running_var",
        "features.stage3.unit1.branches.branch2.conv_list.conv4.conv.weight":
            "Mixed_7a.branch7x7x3_4.conv.weight",
        "features.stage3.unit3.branches.branch3.conv3x1.bn.weight":
            "Mixed_7c.branch3x3dbl_3b.bn.weight",
        "output.fc.bias": "fc.bias",
    }  # fmt: skip
    assert all(converted[tv] is state[cv] for cv, tv in pairs.items())
    path = tmp_path / "inceptionv3.pth"
    torch.save(state, path)
    loaded = torchvision_model(name="inception_v3", weights=str(path), kwargs=kwargs)
    assert torch.equal(loaded.Mixed_7b.branch3x3_2a.conv.weight, state[
        "features.stage3.unit2.branches.branch2.conv1x3.conv.weight"])  # fmt: skip
    # torchvision's weights' input transform and aux head do not fit pytorchcv's
    with pytest.raises(ValueError, match="transform_input.*False"):
        torchvision_model(name="inception_v3", weights=str(path), kwargs={**kwargs,
                          "transform_input": True})  # fmt: skip


def test_pytorchcv_layout_errors_name_the_fix(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(_PytorchcvResNet([3, 4, 6, 3], True, True).state_dict(), path)
    with pytest.raises(ValueError, match="stride_in_1x1"):
        torchvision_model(name="resnet50", weights=str(path))
    torch.save(_PytorchcvMobileNetV2(remove_exp_conv=False).state_dict(), path)
    with pytest.raises(ValueError, match="first_expand_conv"):
        torchvision_model(name="mobilenet_v2", weights=str(path))
    with pytest.raises(ValueError, match="DenseNet"):
        torchvision_model(name="densenet121", weights=str(path))
    with pytest.raises(ValueError, match="'features.stage1.unit1.activ.x'"):
        pytorchcv_resnet_to_torchvision({"features.stage1.unit1.activ.x": torch.zeros(1)})
    with pytest.raises(ValueError, match="'output.fc.weight'"):
        pytorchcv_mobilenetv2_to_torchvision({"output.fc.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="'features.stage4.unit1.branches.branch1.conv.conv.w'"):
        pytorchcv_inceptionv3_to_torchvision(
            {"features.stage4.unit1.branches.branch1.conv.conv.w": torch.zeros(1)}
        )
    with pytest.raises(ValueError, match="stride_in_1x1.*bottleneck"):
        torchvision_model(name="resnet18", kwargs={"stride_in_1x1": True})
    with pytest.raises(ValueError, match="first_expand_conv.*MobileNetV2"):
        torchvision_model(name="resnet18", kwargs={"first_expand_conv": True})
    with pytest.raises(ValueError, match=r"kwargs\['stride_in_1x1'\] must be True or False"):
        torchvision_model(name="resnet50", kwargs={"stride_in_1x1": "yes"})
    with pytest.raises(ValueError, match="weights='hub'"):
        torchvision_model(name="resnet50", weights="hub", kwargs={"stride_in_1x1": True})
