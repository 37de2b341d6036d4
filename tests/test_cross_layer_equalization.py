"""Cross-layer equalization: the float function is kept and the channel ranges are equalized."""

import copy
import logging

import pytest
import torch
from torch import nn

from dfqkit.errors import ConfigError
from dfqkit.models.mnist_resnet import mnist_resnet
from dfqkit.ptq import CrossLayerEqualization
from dfqkit.ptq.cross_layer_equalization import input_ranges, output_ranges, replace_relu6
from dfqkit.quant import QuantConfig, quantize_


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Spread weights and BN statistics so that the channel ranges differ a lot."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                spread = torch.exp(torch.randn(m.weight.shape[0], generator=g))
                m.weight.mul_(spread.view(-1, *([1] * (m.weight.dim() - 1))))
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
                m.weight.copy_(torch.randn(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g))
    return model.eval()


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1, groups=2),  # grouped: input channel i is column i mod 4
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 4, 1),
        nn.LeakyReLU(0.1),
        nn.Conv2d(4, 5, 1),  # no BN in between: the first conv's weight and bias are scaled
    )


def _depthwise_separable(act=nn.ReLU6) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(4, 8, 1, bias=False),
        nn.BatchNorm2d(8),
        act(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),  # depthwise
        nn.BatchNorm2d(8),
        act(),
        nn.Conv2d(8, 5, 1),
    )


def _same(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    assert (a - b).abs().max() <= rel * b.abs().max(), float((a - b).abs().max())


def _pair_ranges(model, pair):
    """Written out channel by channel, independently of the module's vectorized version."""
    first, second = model.get_submodule(pair.first), model.get_submodule(pair.second)
    w1, w2 = first.weight.detach(), second.weight.detach()
    r1 = torch.stack([w1[i].abs().max() for i in range(w1.shape[0])])
    if pair.norm:
        bn = model.get_submodule(pair.norm)
        r1 = r1 * bn.weight.detach().abs() / torch.sqrt(bn.running_var + bn.eps)
    groups = getattr(second, "groups", 1)
    per_group_in, per_group_out = w2.shape[1], w2.shape[0] // groups
    r2 = []
    for i in range(per_group_in * groups):
        g, j = divmod(i, per_group_in)
        r2.append(w2[g * per_group_out : (g + 1) * per_group_out, j].abs().max())
    return r1, torch.stack(r2)


def test_tiny_cnn_keeps_its_function_and_every_pair_is_equalized():
    model = _randomize(_tiny_cnn())
    x = torch.randn(4, 3, 8, 8)
    before = model(x)
    original = copy.deepcopy(model)
    found = CrossLayerEqualization()(model)
    assert [(p.first, p.second) for p in found] == [("0", "3"), ("3", "7"), ("7", "9")]
    assert [p.act.kind for p in found] == ["relu", "relu", "leaky_relu"]
    _same(model(x), before)
    for pair in found:  # converged: both sides of every pair have the same range
        r1, r2 = _pair_ranges(model, pair)
        torch.testing.assert_close(r1, r2, rtol=1e-4, atol=0)
    # the ranges were far from equal before
    r1, r2 = _pair_ranges(original, found[0])
    assert (r1 / r2).max() / (r1 / r2).min() > 10
    # the BN's running statistics and the first conv's weight are kept; γ and β carry the factor
    torch.testing.assert_close(model[0].weight, original[0].weight)
    torch.testing.assert_close(model[1].running_var, original[1].running_var)
    assert not torch.allclose(model[1].weight, original[1].weight)


def test_one_pass_on_an_isolated_pair_gives_the_geometric_mean():
    model = _randomize(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)))
    r1, r2 = output_ranges(model[0]), input_ranges(model[2])
    torch.testing.assert_close(r2, model[2].weight.abs().amax(0))
    x = torch.randn(16, 6)
    before = model(x)
    CrossLayerEqualization(iterations=1)(model)
    n1, n2 = output_ranges(model[0]), input_ranges(model[2])
    torch.testing.assert_close(n1 * n2, r1 * r2)  # the product is invariant
    torch.testing.assert_close(n1, (r1 * r2).sqrt())  # and shared equally
    torch.testing.assert_close(n2, (r1 * r2).sqrt())
    _same(model(x), before)


def test_depthwise_separable_with_relu6_replaced_by_relu():
    model = _randomize(_depthwise_separable())
    x = torch.randn(3, 4, 6, 6)
    reference = copy.deepcopy(model)
    assert replace_relu6(reference) == 2
    assert not any(isinstance(m, nn.ReLU6) for m in reference.modules())
    found = CrossLayerEqualization(relu6="relu")(model)
    assert [(p.first, p.second) for p in found] == [("0", "3"), ("3", "6")]
    assert not any(isinstance(m, nn.ReLU6) for m in model.modules())
    _same(model(x), reference(x))
    for pair in found:
        r1, r2 = _pair_ranges(model, pair)
        torch.testing.assert_close(r1, r2, rtol=1e-4, atol=0)


def test_relu6_is_kept_by_default_and_its_pairs_are_refused():
    model = _randomize(_depthwise_separable())
    with pytest.raises(ConfigError, match=r"train\.transforms.*no conv→conv.*ReLU6"):
        CrossLayerEqualization()(model)
    assert sum(isinstance(m, nn.ReLU6) for m in model.modules()) == 2


def test_resnet8_equalizes_inside_blocks_only_and_keeps_its_function(caplog):
    model = _randomize(mnist_resnet(weights=None), seed=1)
    x = torch.randn(4, 1, 28, 28)
    before = model(x)
    with caplog.at_level(logging.INFO, logger="dfqkit.ptq.cross_layer_equalization"):
        found = CrossLayerEqualization()(model)
    assert [p.first for p in found] == [
        f"features.stage{s}.unit1.body.conv1.conv" for s in (1, 2, 3)
    ]
    assert all(p.second == p.first.replace("conv1", "conv2") for p in found)
    _same(model(x), before)
    # the stem feeds the residual add too: skipped, with the reason logged
    assert "features.init_block.conv: the output of features.init_block.activ feeds 2" in (
        caplog.text
    )


def test_wrong_models_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"train\.transforms: CrossLayerEqualization.*Linear"):
        CrossLayerEqualization()(nn.Linear(3, 2))
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    quantized = quantize_(model, QuantConfig(w_bits=4, a_bits=4), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ConfigError, match="needs the float model, got a quantized"):
        CrossLayerEqualization()(quantized)
    with pytest.raises(ConfigError, match="relu6 must be one of"):
        CrossLayerEqualization(relu6="clip")


class _FunctionalRelu6(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 1), nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.b(nn.functional.relu6(self.a(x)))


def test_a_functional_relu6_is_never_replaced():
    with pytest.raises(ConfigError, match=r"F\.relu6 \(a function, never replaced\)"):
        CrossLayerEqualization(relu6="relu")(_FunctionalRelu6())


def test_torchvision_mobilenet_v2_with_relu6_replaced():
    from torchvision.models import mobilenet_v2

    model = _randomize(mobilenet_v2(width_mult=0.25), seed=3)
    reference = copy.deepcopy(model)
    replace_relu6(reference)
    found = CrossLayerEqualization(relu6="relu")(model)
    # expand → depthwise and depthwise → project inside blocks 2-17, depthwise → project in block
    # 1 (no expansion; at this width it has a residual add, so the stem is skipped), and the
    # last linear bottleneck → the final 1×1 conv (no activation in between, no add)
    names = [(p.first, p.second) for p in found]
    assert len(found) == 32 + 1 + 1
    assert ("features.2.conv.0.0", "features.2.conv.1.0") in names
    assert ("features.17.conv.2", "features.18.0") in names
    assert not any(p.first == "features.0.0" for p in found)
    x = torch.randn(2, 3, 32, 32)
    _same(model(x), reference(x))


def test_equalized_pair_quantizes_better_with_per_tensor_weights():
    from functools import partial

    from dfqkit.quant import MinMaxWeightQuantizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 1), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    spread = torch.logspace(-2, 1, 16)[torch.randperm(16)]
    with torch.no_grad():  # unbalanced channels, the same function (a channel's small range in
        # the first layer is made up for in the second, as in trained networks)
        model[0].weight.mul_(spread.view(-1, 1, 1, 1))
        model[0].bias.mul_(spread)
        model[2].weight.div_(spread.view(1, -1, 1, 1))
    config = QuantConfig(
        w_bits=4,
        a_bits=16,
        policy="layer_inputs",
        weight_quantizer=partial(MinMaxWeightQuantizer, per_channel=False),
    )
    x = torch.randn(64, 4, 4, 4)

    def error(m):
        student = quantize_(copy.deepcopy(m), config, x)
        with torch.no_grad():
            return float((student(x) - m(x)).pow(2).mean() / m(x).pow(2).mean())

    plain = error(model)
    CrossLayerEqualization()(model)
    assert error(model) < plain / 10, (error(model), plain)


def _timm_style(act=nn.ReLU) -> nn.Module:
    """timm's EfficientNet layers: ``Conv2dSame`` (padding computed from the input's shape, which
    plain fx cannot trace) and ``BatchNormAct2d`` (the norm applies its own activation)."""
    from timm.layers import BatchNormAct2d
    from timm.layers.conv2d_same import Conv2dSame

    return nn.Sequential(
        Conv2dSame(3, 8, 3, stride=2, bias=False),
        BatchNormAct2d(8, act_layer=act),
        Conv2dSame(8, 8, 3, stride=2, groups=8, bias=False),  # depthwise
        BatchNormAct2d(8, act_layer=act),
        nn.Conv2d(8, 4, 1, bias=False),
        BatchNormAct2d(4, apply_act=False),  # a linear bottleneck: its norm has no activation
        nn.Conv2d(4, 6, 1),
    )


def test_timm_same_padding_convs_and_norms_with_their_own_activation(caplog):
    model = _randomize(_timm_style())
    x = torch.randn(3, 3, 9, 9)  # odd size: "SAME" padding is asymmetric here
    before = model(x)
    found = CrossLayerEqualization()(model)
    assert [(p.first, p.second, p.norm, p.act.kind) for p in found] == [
        ("0", "2", "1", "relu"),  # the act inside BatchNormAct2d is read as the pair's activation
        ("2", "4", "3", "relu"),
        ("4", "6", "5", "identity"),  # apply_act=False: no activation
    ]
    _same(model(x), before)
    for pair in found:
        r1, r2 = _pair_ranges(model, pair)
        torch.testing.assert_close(r1, r2, rtol=1e-4, atol=0)
    # ReLU6 inside the norm: skipped with the fix named, or replaced and equalized exactly
    relu6 = _randomize(_timm_style(nn.ReLU6))
    with caplog.at_level(logging.INFO, logger="dfqkit.ptq.cross_layer_equalization"):
        kept = CrossLayerEqualization()(copy.deepcopy(relu6))
    assert [(p.first, p.second) for p in kept] == [("4", "6")]
    assert caplog.text.count("relu6 is not positively homogeneous") == 2
    assert "relu6 = 'relu'" in caplog.text
    reference = copy.deepcopy(relu6)
    assert replace_relu6(reference) == 2
    assert len(CrossLayerEqualization(relu6="relu")(relu6)) == 3
    _same(relu6(x), reference(x))
