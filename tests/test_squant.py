"""SQuant's data-free rounding: a hand-computed case, an independent loop formulation of the
paper's algorithm, the properties it guarantees, and its place among the transforms."""

import copy

import pytest
import torch
from torch import nn

from dfqkit.errors import ConfigError
from dfqkit.ptq import BiasCorrection, SQuant, check_transforms, quantize_with
from dfqkit.ptq.squant import squant_layer, squant_round
from dfqkit.quant import QuantConfig
from dfqkit.quant.weight_adaround import AdaRoundWeightQuantizer


def _loop_squant(r, low, high, movable):
    """The paper's Algorithm 1 written with plain loops over channels and kernels (no sorting
    tricks): K level per kernel, then C level per channel over one candidate per kernel (or
    every weight when a kernel has one)."""
    c_out, kernels, n = r.shape
    q = r.round()
    e = q - r
    out = q.clone()
    for o in range(c_out):
        lo, hi = float(low[o]), float(high[o])
        err = e[o].clone()
        cands = []  # (direction, priority, kernel, index) for the C level
        for g in range(kernels):
            row = err[g]
            if n > 1:
                total = float(row.sum())
                d = 1.0 if total < 0 else -1.0
                ok = [
                    i
                    for i in range(n)
                    if movable[o, g, i]
                    and (
                        (d > 0 and row[i] < 0 and out[o, g, i] + 1 <= hi)
                        or (d < 0 and row[i] > 0 and out[o, g, i] - 1 >= lo)
                    )
                ]
                ok.sort(key=lambda i: -abs(float(row[i])))
                t = min(int(torch.tensor(abs(total)).round()), len(ok))
                for i in ok[:t]:
                    out[o, g, i] += d
                    row[i] += d
                if t > 0 and t >= abs(total):
                    i = ok[t - 1]
                    cands.append((-d, abs(float(row[i])), g, i))
                elif t < len(ok):
                    i = ok[t]
                    cands.append((d, abs(float(row[i])), g, i))
            else:
                i = 0
                if movable[o, g, i] and row[i] < 0 and out[o, g, i] + 1 <= hi:
                    cands.append((1.0, abs(float(row[i])), g, i))
                if movable[o, g, i] and row[i] > 0 and out[o, g, i] - 1 >= lo:
                    cands.append((-1.0, abs(float(row[i])), g, i))
        total = float(err.sum())
        dc = 1.0 if total < 0 else -1.0
        mine = sorted(
            [c for c in cands if c[0] == dc], key=lambda c: (-c[1], c[2] * n + c[3])
        )  # by priority, ties in element order
        t = min(int(torch.tensor(abs(total)).round()), len(mine))
        for _, _, g, i in mine[:t]:
            out[o, g, i] += dc
    return out


def test_a_hand_computed_kernel():
    # r = [0.1, 0.3, 0.45]: nearest rounding gives 0, 0, 0 (errors -0.1, -0.3, -0.45, sum
    # -0.85): one weight goes up, the one closest to its upper neighbour (0.45)
    r = torch.tensor([[[0.1, 0.3, 0.45]]], dtype=torch.float64)
    low, high = torch.zeros(1, 1, 1, dtype=torch.float64), torch.full((1, 1, 1), 15.0).double()
    assert squant_round(r, low, high).tolist() == [[[0.0, 0.0, 1.0]]]
    # [1.6, 2.7, 3.2, 0.9]: nearest 2, 3, 3, 1 (errors .4 .3 -.2 .1, sum .6): one goes down,
    # the one with the largest positive error (1.6 -> 1)
    r = torch.tensor([[[1.6, 2.7, 3.2, 0.9]]], dtype=torch.float64)
    assert squant_round(r, low, high).tolist() == [[[1.0, 3.0, 3.0, 1.0]]]
    # the channel level alone on a 1-weight-kernel layer: errors .4 .4 .4 (sum 1.2) -> one down
    r = torch.tensor([[[0.6], [1.6], [2.6]]], dtype=torch.float64)
    assert squant_round(r, low, high).tolist() == [[[0.0], [2.0], [3.0]]]


@pytest.mark.parametrize("shape", [(5, 4, 9), (3, 1, 9), (6, 7, 1), (4, 3, 25)])
def test_matches_the_loop_formulation(shape):
    torch.manual_seed(sum(shape))
    r = torch.rand(shape, dtype=torch.float64) * 15
    low = torch.zeros(shape[0], 1, 1, dtype=torch.float64)
    high = torch.full((shape[0], 1, 1), 15.0, dtype=torch.float64)
    low[0], high[-1] = 2.0, 12.0  # narrowed ranges: codes outside are held at the ends
    r[0].clamp_(min=1.8)
    r[-1].clamp_(max=12.2)
    movable = torch.rand(shape) > 0.1
    got = squant_round(r, low, high, movable)
    assert torch.equal(got, _loop_squant(r, low, high, movable))
    assert torch.equal(squant_round(r, low, high), _loop_squant(r, low, high, movable | True))


def _layer(groups=1, bits=4, seed=0, cin=8, cout=8):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 3, padding=1, groups=groups)
    example = torch.zeros(2, cin, 8, 8)
    return quantize_with(
        nn.Sequential(conv, nn.ReLU()), QuantConfig(w_bits=bits, a_bits=8), example, []
    )[0]


@pytest.mark.parametrize("groups", [1, 8])
def test_the_sums_of_errors_are_bounded_and_the_grid_does_not_move(groups):
    layer = _layer(groups)
    w0 = layer.weight.detach().clone()
    q0, s, z = layer.weight_quant.codes(w0)
    r = (w0.double() / s.double() - z.double()).clamp(-8, 7)  # the 4-bit grid
    changed = squant_layer(layer)
    q, s1, z1 = layer.weight_quant.codes(layer.weight.detach())
    assert changed > 0 and torch.equal(s1, s) and torch.equal(z1, z)  # same grid
    w = layer.weight.detach()
    assert torch.equal(w.amin((1, 2, 3)), w0.amin((1, 2, 3)))
    assert torch.equal(w.amax((1, 2, 3)), w0.amax((1, 2, 3)))
    # every code is one of the two grid points around the weight
    assert bool(((q.double() - r.floor() == 0) | (q.double() - r.ceil() == 0)).all())
    e = q.double() - r
    kernel = e.sum((2, 3)).abs()
    channel = e.sum((1, 2, 3)).abs()
    rtn = (q0.double() - r).sum((2, 3)).abs()
    assert float(kernel.max()) <= 1.0 + 1e-9 and float(channel.max()) <= 0.5 + 1e-9
    if groups == 8:  # one kernel per channel: the kernel level already bounds it by 1/2
        assert float(kernel.max()) <= 0.5 + 1e-9
    assert float(kernel.mean()) < float(rtn.mean()) / 2
    # weights not flipped keep their float values exactly
    same = q == q0
    assert torch.equal(w[same], w0[same]) and int((~same).sum()) == changed


def test_the_output_error_on_smooth_inputs_falls():
    """On a spatially smooth input (what the kernel-level constraint assumes), SQuant's
    depthwise output is closer to the float output than round-to-nearest's."""
    layer = _layer(groups=8, bits=4, seed=3)
    float_w = layer.weight.detach().clone()
    torch.manual_seed(1)
    x = nn.functional.interpolate(torch.randn(16, 8, 4, 4), size=16, mode="bilinear") + 1.0

    def err():
        wq = layer.weight_quant(layer.weight.detach())
        y = nn.functional.conv2d(x, wq, None, padding=1, groups=8)
        ref = nn.functional.conv2d(x, float_w, None, padding=1, groups=8)
        return float((y - ref).pow(2).mean())

    before = err()
    squant_layer(layer)
    assert err() < 0.5 * before


def test_linear_layers_use_the_channel_level_only():
    torch.manual_seed(0)
    lin = quantize_with(
        nn.Sequential(nn.Linear(30, 5), nn.ReLU()),
        QuantConfig(w_bits=3, a_bits=8),
        torch.zeros(2, 30),
        [],
    )[0]
    q0, s, z = lin.weight_quant.codes(lin.weight.detach())
    r = (lin.weight.detach().double() / s.double() - z.double()).clamp(-4, 3)  # 3-bit grid
    squant_layer(lin)
    q = lin.weight_quant.codes(lin.weight.detach())[0].double()
    assert float((q - r).sum(1).abs().max()) <= 0.5 + 1e-9
    assert float((q0.double() - r).sum(1).abs().max()) > 0.5  # round-to-nearest was not


def test_placement_among_transforms_and_bias_correction_against_the_float_weights():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3))
    torch.manual_seed(0)
    with torch.no_grad():
        model[1].bias.uniform_(0.5, 1.5)
    model.eval()
    config = QuantConfig(w_bits=4, a_bits=8)
    with pytest.raises(ConfigError, match=r"the stages must run in the order"):
        check_transforms([BiasCorrection(), SQuant()])
    x = torch.zeros(2, 2, 8, 8)
    student = quantize_with(copy.deepcopy(model), config, x, [SQuant(), BiasCorrection()])
    plain = quantize_with(copy.deepcopy(model), config, x, [SQuant()])
    # the correction is -(W_q - W_float)·E[x] for the final codes, not for the codes before SQuant
    from dfqkit.ptq.bias_correction import _relu_mean

    mean = _relu_mean(model[1].bias.detach().double(), model[1].weight.detach().double().abs())
    err = plain[3].weight_quant(plain[3].weight.detach()).double() - model[3].weight.double()
    want = model[3].bias.double() - (err.sum((2, 3)) * mean).sum(1)
    torch.testing.assert_close(student[3].bias.detach().double(), want, rtol=0, atol=1e-6)
    assert not torch.equal(plain[3].weight, model[3].weight)


def test_a_quantizer_with_its_own_rounding_is_refused():
    config = QuantConfig(w_bits=4, a_bits=8, weight_quantizer=AdaRoundWeightQuantizer)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU())
    with pytest.raises(ConfigError, match="SQuant.*AdaRoundWeightQuantizer"):
        quantize_with(model, config, torch.zeros(2, 2, 8, 8), [SQuant()])
    with pytest.raises(ConfigError, match="would change nothing"):
        SQuant(kernel=False, channel=False)
    assert repr(SQuant()) == "SQuant()" and "kernel=False" in repr(SQuant(kernel=False))
