import pytest
import torch
from torch import nn

from dfqkit.optim import GradientInundationSGD
from dfqkit.quant import QuantConfig, QuantLinear, quantize_


def _layer(bits=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU())
    model = quantize_(model, QuantConfig(w_bits=bits, a_bits=8), torch.randn(2, 16))
    return next(m for m in model.modules() if isinstance(m, QuantLinear))


def _codes(layer):
    return layer.weight_quant.codes(layer.weight)[0]


def test_a_tiny_step_is_inundated_until_enough_codes_change():
    layer = _layer()
    layer.weight.grad = torch.randn_like(layer.weight)
    before = _codes(layer).clone()
    w0 = layer.weight.detach().clone()
    opt = GradientInundationSGD(
        [layer.weight], lr=1e-5, momentum=0.0, threshold=0.05, max_alpha=4096.0
    )
    opt.step()
    changed = (_codes(layer) != before).float().mean().item()
    plain = w0 - 1e-5 * layer.weight.grad
    assert (_codes_of(layer, plain) != before).float().mean().item() < 0.05
    assert changed >= 0.05
    # the step is one multiple α of the plain step for the whole tensor
    moved = layer.weight.detach() - w0
    step = -1e-5 * layer.weight.grad
    alpha = (moved.flatten() @ step.flatten()) / (step.flatten() @ step.flatten())
    torch.testing.assert_close(moved, alpha * step, rtol=0, atol=1e-6)
    assert 1.0 < alpha.item() <= 4096.0
    # and (bisection) not much larger than needed: 10 % less would change too few codes
    smaller = w0 + 0.9 * (layer.weight.detach() - w0)
    assert (_codes_of(layer, smaller) != before).float().mean().item() < changed


def _codes_of(layer, w):
    return layer.weight_quant.codes(w)[0]


def test_a_large_step_and_unquantized_parameters_take_the_plain_step():
    layer = _layer()
    layer.weight.grad = torch.randn_like(layer.weight)
    layer.bias.grad = torch.randn_like(layer.bias)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = GradientInundationSGD([layer.weight, layer.bias], lr=1.0, momentum=0.0)
    opt.step()
    torch.testing.assert_close(layer.weight.detach(), w0 - layer.weight.grad)
    torch.testing.assert_close(layer.bias.detach(), b0 - layer.bias.grad)


def test_threshold_follows_the_learning_rate_and_is_validated():
    layer = _layer()
    layer.weight.grad = torch.randn_like(layer.weight)
    opt = GradientInundationSGD(
        [layer.weight], lr=1e-4, momentum=0.0, threshold=0.5, max_alpha=4096.0
    )
    opt.param_groups[0]["lr"] = 1e-5  # the schedule decayed the lr ×0.1: threshold 0.05
    before = _codes(layer).clone()
    opt.step()
    changed = (_codes(layer) != before).float().mean().item()
    assert 0.05 <= changed < 0.5
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
        GradientInundationSGD([layer.weight], lr=0.1, threshold=0.0)
