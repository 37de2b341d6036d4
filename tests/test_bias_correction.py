"""Analytic bias correction: the closed form against a hand computation and Monte Carlo."""

import copy
import math

import pytest
import torch
from torch import nn

from dfqkit.errors import ConfigError
from dfqkit.ptq import BiasCorrection, CrossLayerEqualization, quantize_with
from dfqkit.ptq.bias_correction import correct_layer, expected_input, output_shift
from dfqkit.ptq.graph import Activation
from dfqkit.quant import MinMaxWeightQuantizer, QuantConfig
from dfqkit.quant.modules import QuantConv2d, QuantLinear

ACTS = {
    "identity": (Activation("identity"), lambda x: x),
    "relu": (Activation("relu"), torch.relu),
    "relu6": (Activation("relu6"), lambda x: x.clamp(0, 6)),
    "leaky_relu": (Activation("leaky_relu", slope=0.2), nn.LeakyReLU(0.2)),
}


class _RoundToIntegers(nn.Module):
    def forward(self, w):
        return w.round()


def _bn(gamma, beta):
    bn = nn.BatchNorm2d(len(gamma)).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(gamma))
        bn.bias.copy_(torch.tensor(beta))
    return bn


def test_two_channel_case_by_hand():
    # channel 0: N(0, 1) through ReLU: E = φ(0); channel 1: N(-1, 2²): E = -Φ(-1/2) + 2 φ(-1/2)
    phi0, cdf_half, phi_half = 0.3989422804014327, 0.3085375387259869, 0.3520653267642995
    e = expected_input(torch.tensor([0.0, -1.0]), torch.tensor([1.0, 2.0]), Activation("relu"))
    torch.testing.assert_close(e, torch.tensor([phi0, -cdf_half + 2 * phi_half], dtype=e.dtype))
    layer = QuantLinear.from_float(
        nn.Linear(2, 1), weight_quant=_RoundToIntegers(), input_quant=None
    )
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.3, 1.6]]))  # quantized: [[0, 2]], error [-0.3, 0.4]
        layer.bias.fill_(0.5)
    bn = nn.BatchNorm1d(2).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.0]))  # the sign of γ does not matter
        bn.bias.copy_(torch.tensor([0.0, -1.0]))
    shift = correct_layer(layer, bn, Activation("relu"))
    expected = -0.3 * phi0 + 0.4 * (-cdf_half + 2 * phi_half)
    assert float(shift) == pytest.approx(expected, rel=1e-6)
    assert float(layer.bias.detach()) == pytest.approx(0.5 - expected, rel=1e-6)


@pytest.mark.parametrize("act", sorted(ACTS))
def test_expected_input_matches_sample_means(act):
    kind, fn = ACTS[act]
    g = torch.Generator().manual_seed(1)
    mu = torch.tensor([-3.0, -0.5, 0.0, 1.0, 4.0, 5.5, 8.0, 3.0], dtype=torch.float64)
    sigma = torch.tensor([1.0, 0.3, 2.0, 1.0, 2.5, 1.0, 0.5, 0.0], dtype=torch.float64)
    x = fn(mu + sigma * torch.randn(200_000, 8, generator=g, dtype=torch.float64))
    mean, se = x.mean(0), x.std(0) / math.sqrt(len(x))
    predicted = expected_input(mu, sigma, kind)
    assert ((predicted - mean).abs() <= 4.5 * se + 1e-9).all(), (predicted, mean, se)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("act", sorted(ACTS))
def test_closed_form_matches_monte_carlo(act, groups):
    kind, fn = ACTS[act]
    g = torch.Generator().manual_seed(0)
    c_in, c_out = 6, 6
    conv = nn.Conv2d(c_in, c_out, 3, groups=groups, bias=False)  # no padding: interior only
    quantizer = MinMaxWeightQuantizer(bits=3)
    layer = QuantConv2d.from_float(conv, weight_quant=quantizer, input_quant=None)
    mu = torch.randn(c_in, generator=g) * 2 + 2  # mass above 6 too (ReLU6)
    sigma = torch.rand(c_in, generator=g) * 3 + 0.2
    predicted = output_shift(layer, expected_input(mu, sigma, kind))
    n = 40_000
    x = fn(mu.view(1, -1, 1, 1) + sigma.view(1, -1, 1, 1) * torch.randn(n, c_in, 3, 3, generator=g))
    err = layer.weight_quant(layer.weight) - layer.weight
    with torch.no_grad():
        per_sample = nn.functional.conv2d(x.double(), err.double(), groups=groups).flatten(1)
    mean, se = per_sample.mean(0), per_sample.std(0) / math.sqrt(n)
    assert predicted.abs().max() > 10 * se.max()  # a shift worth correcting
    assert ((predicted - mean).abs() <= 4.5 * se + 1e-9).all(), (predicted, mean, se)


def test_corrected_student_has_no_mean_shift_on_gaussian_bn_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.BatchNorm2d(4), nn.ReLU6(), nn.Conv2d(4, 5, 3, bias=False), nn.BatchNorm2d(5)
    ).eval()
    with torch.no_grad():  # running stats N(0, 1): the BN output is N(β, γ²) on N(0, 1) input
        model[0].weight.copy_(torch.tensor([1.0, 2.0, 0.5, 3.0]))
        model[0].bias.copy_(torch.tensor([0.5, -1.0, 2.0, 4.0]))
    x = torch.randn(20_000, 4, 3, 3)
    config = QuantConfig(w_bits=3, a_bits=16, policy="layer_inputs", quantize_input=True)
    plain = quantize_with(copy.deepcopy(model), config, x[:2])
    corrected = quantize_with(copy.deepcopy(model), config, x[:2], [BiasCorrection()])
    assert plain[2].bias is None and isinstance(corrected[2].bias, nn.Parameter)
    with torch.no_grad():
        reference = model[:3](x).mean(0)
        before = (plain[:3](x).mean(0) - reference).abs().max()
        after = (corrected[:3](x).mean(0) - reference).abs().max()
    assert before > 0.05 and after < before / 10, (before, after)


def test_only_quantized_layers_are_corrected_and_wrong_input_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))
    example = torch.zeros(2, 1, 8, 8)
    sites, weights = BiasCorrection().before(model, example)
    assert [(s.layer, s.norm, s.act.kind) for s in sites] == [("3", "1", "relu")]
    assert list(weights) == ["3"] and torch.equal(weights["3"], model[3].weight)
    config = QuantConfig(w_bits=4, a_bits=4)
    keep = model[3].bias.detach().clone()
    student = quantize_with(model, config, example, [BiasCorrection()])
    assert not torch.equal(student[3].bias.detach(), keep)
    with pytest.raises(ConfigError, match=r"train\.transforms: BiasCorrection\(\) needs the float"):
        BiasCorrection().before(student, example)
    with pytest.raises(ConfigError, match="found no conv or linear layer fed by a batch norm"):
        BiasCorrection().before(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)), None)
    # after CLE with ReLU6 replaced, bias correction sees the ReLU
    dw = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4), nn.ReLU6(), nn.Conv2d(4, 3, 1))
    CrossLayerEqualization(relu6="relu").before(dw, None)
    assert [s.act.kind for s in BiasCorrection().before(dw, None)[0]] == ["relu"]


def test_timm_norms_with_their_own_activation_are_sites():
    from timm.layers import BatchNormAct2d
    from timm.layers.conv2d_same import Conv2dSame

    model = nn.Sequential(
        Conv2dSame(3, 4, 3, stride=2, bias=False),
        BatchNormAct2d(4, act_layer=nn.ReLU6),
        Conv2dSame(4, 4, 3, stride=2, groups=4, bias=False),
        BatchNormAct2d(4, apply_act=False),
        nn.Conv2d(4, 2, 1),
    ).eval()
    sites, _ = BiasCorrection().before(model, None)
    assert [(s.layer, s.norm, s.act.kind) for s in sites] == [
        ("2", "1", "relu6"),
        ("4", "3", "identity"),
    ]
    # an activation the closed forms do not cover is not a site
    model[1] = BatchNormAct2d(4, act_layer=nn.SiLU)
    assert [s.layer for s in BiasCorrection().before(model, None)[0]] == ["4"]
    # both same-padding and plain layers are corrected once quantized
    example = torch.zeros(2, 3, 9, 9)
    model[1] = BatchNormAct2d(4, act_layer=nn.ReLU6)
    with torch.no_grad():  # E[x] = β with no activation: a zero β would need no correction
        model[3].bias.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    keep = model[4].bias.detach().clone()
    student = quantize_with(model, QuantConfig(w_bits=3, a_bits=8), example, [BiasCorrection()])
    assert isinstance(student[2].bias, nn.Parameter)  # the depthwise Conv2dSame got a bias
    assert not torch.equal(student[4].bias.detach(), keep)
