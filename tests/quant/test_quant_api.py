import copy

import pytest
import timm
import torch
import torch.fx as fx
import torchvision
from torch import nn
from torch.nn import functional as F

from dfqkit.quant import (
    MinMaxActQuantizer,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    act_quantizers,
    float_layers,
    quantize_,
    set_quant_mode,
    sync_quantizers,
)

X = torch.randn(1, 3, 32, 32)
W4A4 = QuantConfig(w_bits=4, a_bits=4)


def _resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10).eval()


class FunctionalNet(nn.Module):
    """Functional ReLUs (F.relu, torch.relu, F.relu6, Tensor.relu) and a ReLU module."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = torch.relu(self.conv(x)) + x
        x = F.relu6(self.act(x)).relu()
        return self.fc(x.mean((2, 3)))


def _count(model: nn.Module, types) -> int:
    return sum(isinstance(m, types) for m in model.modules())


def test_resnet18_reused_relu_takes_fx_path_and_matches_at_16_bits():
    teacher = _resnet18()
    student = quantize_(copy.deepcopy(teacher), QuantConfig(w_bits=16, a_bits=16), X)
    assert isinstance(student, fx.GraphModule)
    assert len(act_quantizers(student)) == 17  # stem 1 + 8 blocks x 2 relu call sites
    assert _count(student, QuantConv2d) == 20 and _count(student, QuantLinear) == 1
    # parameter and buffer names unchanged; quantizers only add their own
    extra = set(student.state_dict()) - set(teacher.state_dict())
    assert set(teacher.state_dict()) <= set(student.state_dict())
    assert all("_quant" in key for key in extra)
    with torch.no_grad():
        expected, got = teacher(X), student(X)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3 * expected.abs().max().item())


def test_mobilenet_v2_module_path_wraps_every_relu6():
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    n_relu6 = _count(model, nn.ReLU6)
    quantized = quantize_(model, W4A4, X)
    assert quantized is model and type(model) is torchvision.models.MobileNetV2
    assert len(act_quantizers(model)) == n_relu6 == 35
    wrapped = model.features[1].conv[0][2]  # GDFQ: Sequential(ReLU6, quantizer)
    assert isinstance(wrapped, nn.Sequential) and isinstance(wrapped[0], nn.ReLU6)
    assert model(X).shape == (1, 10)


def test_timm_cnn():
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()
    n_relu = _count(model, nn.ReLU)
    quantized = quantize_(model, W4A4, X)
    assert quantized is model  # one ReLU module per call site: GDFQ's module path
    assert len(act_quantizers(quantized)) == n_relu == 11
    assert _count(quantized, (QuantConv2d, QuantLinear)) == 15
    assert torch.isfinite(quantized(X)).all()


def test_functional_relus_get_one_quantizer_per_call_site():
    model = FunctionalNet().eval()
    quantized = quantize_(model, W4A4, torch.randn(2, 3, 8, 8))
    assert isinstance(quantized, fx.GraphModule)
    assert len(act_quantizers(quantized)) == 5  # F.relu, torch.relu, act, F.relu6, .relu()
    quantized(torch.randn(2, 3, 8, 8))
    assert all(q.num_updates.item() == 1 for q in act_quantizers(quantized))


def test_first_and_last_layer_bits():
    config = QuantConfig(w_bits=4, a_bits=4, first_layer_bits=8, last_layer_bits=6)
    model = quantize_(_resnet18(), config, X)
    bits = {n: m.weight_quant.bits for n, m in model.named_modules() if hasattr(m, "weight_quant")}
    assert bits.pop("conv1") == 8 and bits.pop("fc") == 6
    assert set(bits.values()) == {4}


def _bits_by_name(model: nn.Module) -> dict[str, int]:
    return {n: m.bits for n, m in model.named_modules() if isinstance(m, MinMaxActQuantizer)}


@pytest.mark.parametrize("path", ["modules", "fx_reused_relu", "fx_functional"])
def test_after_relu_second_input_bits_is_the_stems_activation_only(path):
    """Under ``after_relu``, ``second_input_bits`` widens exactly the quantizers of the ReLU
    calls between the first and the second layer (the stem's output): on the module path, on
    the fx path of a reused ReLU module, and for a functional ReLU."""
    if path == "modules":
        model, x, stem = torchvision.models.mobilenet_v2(num_classes=10).eval(), X, "features.0.2.1"
    elif path == "fx_reused_relu":
        model, x, stem = _resnet18(), X, "relu_quant"
    else:
        model, x, stem = FunctionalNet().eval(), torch.randn(2, 3, 8, 8), "relu_quant"
    base = dict(w_bits=4, a_bits=4, act_quantizer=MinMaxActQuantizer)
    plain = _bits_by_name(quantize_(copy.deepcopy(model), QuantConfig(**base), x))
    assert set(plain.values()) == {4}
    bits = _bits_by_name(quantize_(model, QuantConfig(**base, second_input_bits=8), x))
    assert set(bits) == set(plain)  # the same placement
    assert bits.pop(stem) == 8, bits
    assert set(bits.values()) == {4}


def test_layer_bits_names_layers_over_the_position_rules():
    config = QuantConfig(
        w_bits=4, a_bits=4, first_layer_bits=8, layer_bits={"layer1.0.conv1": 8, "conv1": 6}
    )
    model = quantize_(_resnet18(), config, X)
    bits = {n: m.weight_quant.bits for n, m in model.named_modules() if hasattr(m, "weight_quant")}
    assert bits.pop("layer1.0.conv1") == 8 and bits.pop("conv1") == 6  # the name wins
    assert set(bits.values()) == {4}


def test_layer_bits_with_a_misspelled_name_is_refused_with_the_close_match():
    config = QuantConfig(w_bits=4, a_bits=4, layer_bits={"layer1.0.conv_1": 8})
    with pytest.raises(ValueError, match=r"'layer1.0.conv_1' \(did you mean 'layer1.0.conv1'\?\)"):
        quantize_(_resnet18(), config, X)
    with pytest.raises(ValueError, match=r"layer_bits\['fc'\] must be in 2..16, got 1"):
        QuantConfig(w_bits=4, a_bits=4, layer_bits={"fc": 1})


@pytest.mark.parametrize("quantize_input", [False, True])
def test_layer_inputs_policy(quantize_input):
    config = QuantConfig(
        w_bits=4, a_bits=4, policy="layer_inputs", quantize_input=quantize_input, last_layer_bits=8
    )
    model = quantize_(_resnet18(), config, X)
    assert type(model) is torchvision.models.ResNet
    assert len(act_quantizers(model)) == 21 - 1 + quantize_input  # 20 convs + fc
    assert (model.conv1.input_quant is not None) == quantize_input
    assert model.fc.input_quant.bits == 8 and model.layer1[0].conv1.input_quant.bits == 4


def test_filter_fn_keeps_layers_float():
    model = quantize_(_resnet18(), W4A4, X, filter_fn=lambda module, fqn: fqn != "fc")
    assert type(model.fc) is nn.Linear and isinstance(model.conv1, QuantConv2d)


def test_teacher_untouched_and_dry_run_keeps_bn_statistics():
    teacher = torchvision.models.resnet18(num_classes=10).train()
    snapshot = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = quantize_(copy.deepcopy(teacher), W4A4, X)
    assert student.training and student.get_submodule("layer1.0.bn1").training
    for key, value in student.state_dict().items():  # the dry run ran in eval mode
        if key in snapshot:
            torch.testing.assert_close(value, snapshot[key], rtol=0, atol=0)
    student.eval()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    student(X).sum().backward()
    assert student.get_submodule("conv1").weight.grad.abs().sum() > 0  # STE passes gradients
    opt.step()
    assert _count(teacher, (QuantConv2d, QuantLinear)) == 0
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, snapshot[key], rtol=0, atol=0)


def test_state_dict_round_trip():
    config = QuantConfig(w_bits=4, a_bits=4, act_quantizer=MinMaxActQuantizer)
    source = quantize_(_resnet18(), config, X)
    source(torch.randn(2, 3, 32, 32))
    target = quantize_(_resnet18(), config, X)
    target.load_state_dict(source.state_dict())
    set_quant_mode(source, "frozen")
    set_quant_mode(target, "frozen")  # raises on forward if the observed state did not load
    for a, b in zip(act_quantizers(source), act_quantizers(target)):
        assert (a.lo.item(), a.hi.item(), a.num_updates.item()) == (
            b.lo.item(),
            b.hi.item(),
            b.num_updates.item(),
        )
    with torch.no_grad():
        torch.testing.assert_close(target(X), source(X))


def test_quant_modes():
    model = quantize_(FunctionalNet(), W4A4, torch.randn(1, 3, 8, 8))
    set_quant_mode(model, "frozen")
    with pytest.raises(RuntimeError, match="never observed"):
        model(torch.randn(1, 3, 8, 8))
    set_quant_mode(model, "observe")
    model(torch.randn(1, 3, 8, 8))
    sync_quantizers(model)  # single process: no-op
    with pytest.raises(ValueError, match="mode must be one of 'observe', 'frozen', got 'calib'"):
        set_quant_mode(model, "calib")


def test_errors_name_model_and_policy():
    no_relu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU())
    with pytest.raises(ValueError, match="policy 'after_relu' placed no activation quantizer in"):
        quantize_(no_relu, W4A4, X)
    model = quantize_(FunctionalNet(), W4A4, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, W4A4, torch.randn(1, 3, 8, 8))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv(x))
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = self.relu(self.conv(x))
        return x


def test_untraceable_model_fails_with_advice():
    with pytest.raises(RuntimeError, match="policy='layer_inputs'"):
        quantize_(Untraceable(), W4A4, X)
    config = QuantConfig(w_bits=4, a_bits=4, policy="layer_inputs", quantize_input=True)
    assert len(act_quantizers(quantize_(Untraceable(), config, X))) == 1


def test_timm_conv2d_same_is_quantized_with_its_same_padding():
    from timm.layers.conv2d_same import Conv2dSame

    from dfqkit.quant import QuantConv2dSame

    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    x = torch.randn(2, 3, 9, 9)  # odd size: "SAME" pads 0 before and 1 after at stride 2
    model(x)
    float_out = model[0](x)
    q = quantize_(copy.deepcopy(model), QuantConfig(w_bits=3, a_bits=8), x)
    conv = q[0]
    assert type(conv) is QuantConv2dSame and conv.padding == (0, 0)
    # an independent formulation: pad by hand as TensorFlow's "SAME" does (output ceil(9 / 2),
    # the total padding split with the extra pixel after)
    out_size = -(-9 // 2)  # ceil(9 / 2) = 5
    total = max((out_size - 1) * 2 + 3 - 9, 0)  # 2
    padded = F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2))
    expected = F.conv2d(padded, conv.weight_quant(conv.weight), conv.bias, stride=2)
    assert torch.equal(conv(x), expected) and expected.shape == float_out.shape
    assert not torch.allclose(expected, float_out, atol=1e-3)  # the weight is quantized
    hi = quantize_(copy.deepcopy(model), QuantConfig(w_bits=16, a_bits=16), x)[0]
    torch.testing.assert_close(hi(x), float_out, atol=1e-3, rtol=1e-3)


def test_a_layer_with_its_own_forward_stays_float_with_a_warning(caplog):
    class Scaled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Scaled(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with caplog.at_level("WARNING"):
        q = quantize_(model, W4A4, X)
    assert type(q[0]) is Scaled and isinstance(q[2], QuantConv2d)
    assert "1 of 2 convolution/linear layers stay in float" in caplog.text
    assert "0 (Scaled)" in caplog.text
    assert float_layers(q) == ["0 (Scaled)"]  # what metrics.json lists
    caplog.clear()
    q_plain = quantize_(plain, W4A4, X)
    assert "stay in float" not in caplog.text
    assert float_layers(q_plain) == []
    # a layer a filter keeps in float is listed too
    filtered = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    q_filtered = quantize_(filtered, W4A4, X, filter_fn=lambda m, name: name != "2")
    assert float_layers(q_filtered) == ["2 (Conv2d)"]
