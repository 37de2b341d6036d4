"""Genie-M's quantizers: the L2.4 clip search, AdaRound weights and LSQ activations."""

import pytest
import torch

from dfqkit.quant import (
    AdaRoundWeightQuantizer,
    LSQActQuantizer,
    fake_quant,
    quantize_,
    set_quant_mode,
)
from dfqkit.quant.config import QuantConfig
from dfqkit.quant.search import RATIOS, search_asymmetric, search_symmetric, symmetric_bounds
from dfqkit.quant.weight_adaround import rectified_sigmoid, rectified_sigmoid_inverse


def _brute_force_asym(row, bits):
    """Independent: every ratio through dfqkit.quant.fake_quant, error as a Python float."""
    best = None
    for r in RATIOS:
        lo, hi = row.min() * r, row.max() * r
        err = (fake_quant(row, lo, hi, bits) - row).abs().pow(2.4).mean().item()
        if best is None or err < best[0]:
            best = (err, lo.item(), hi.item())
    return best[1], best[2]


def test_asymmetric_search_matches_a_brute_force_loop_and_clips_outliers():
    torch.manual_seed(0)
    x = torch.randn(3, 2000)
    x[1, 0] = 8.0  # one outlier among 2,000: the best range clips it
    lo, hi = search_asymmetric(x, 3)
    for c in range(3):
        want_lo, want_hi = _brute_force_asym(x[c], 3)
        assert lo[c].item() == pytest.approx(want_lo, rel=1e-6)
        assert hi[c].item() == pytest.approx(want_hi, rel=1e-6)
    assert hi[1] < 0.75 * 8.0


def test_symmetric_search_signed_and_unsigned_grids():
    torch.manual_seed(0)
    pos = torch.rand(1000) * 4.0
    s = search_symmetric(pos, 4, torch.tensor(False))
    lo, hi = symmetric_bounds(s, torch.tensor(False), 4)
    assert lo.item() == 0.0 and hi.item() == pytest.approx(15 * s.item())
    # independent: brute force over the same step sizes
    errs = []
    for r in RATIOS:
        step = 4.0 * float(pos.max()) * r / 15
        q = (pos / step).round().clamp(0, 15) * step
        errs.append(((q - pos).abs().pow(2.4).mean().item(), step))
    assert s.item() == pytest.approx(min(errs)[1], rel=1e-5)
    signed = torch.randn(1000)
    s2 = search_symmetric(signed, 4, torch.tensor(True))
    lo2, hi2 = symmetric_bounds(s2, torch.tensor(True), 4)
    assert lo2.item() == pytest.approx(-8 * s2.item()) and hi2.item() == pytest.approx(
        7 * s2.item()
    )


def test_symmetric_search_on_a_strided_subsample_keeps_the_whole_tensors_extreme():
    torch.manual_seed(0)
    x = torch.rand(1000) * 2.0
    x[7] = 9.0  # the extreme, outside the stride-4 subsample x[0::4]
    s = search_symmetric(x, 3, torch.tensor(False), max_elements=250)
    sub = x[::4]
    assert sub.numel() == 250 and sub.max() < 9.0
    errs = []  # independent: brute force on the subsample, candidates from the whole max 9.0
    for r in RATIOS:
        step = 9.0 * r / 7
        q = (sub / step).round().clamp(0, 7) * step
        errs.append(((q - sub).abs().pow(2.4).mean().item(), step))
    assert s.item() == pytest.approx(min(errs)[1], rel=1e-5)
    # a tensor that fits is searched whole: the result is the uncapped one, bit for bit
    assert torch.equal(
        search_symmetric(x, 3, torch.tensor(False), max_elements=1000),
        search_symmetric(x, 3, torch.tensor(False)),
    )
    with pytest.raises(ValueError, match="max_elements"):
        search_symmetric(x, 3, torch.tensor(False), max_elements=0)


def test_lsq_quantizer_caps_its_search_and_refuses_a_bad_cap():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 10, 10) * 3.0
    capped = LSQActQuantizer(bits=4, search_elements=300)
    set_quant_mode(capped, "observe")
    capped(x)
    want = search_symmetric(x, 4, torch.tensor(False), max_elements=300)
    assert capped.scale.item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="search_elements"):
        LSQActQuantizer(bits=4, search_elements=0)


def test_rectified_sigmoid_inverse_and_rounding_loss():
    h = torch.tensor([0.0, 0.1, 0.5, 0.9])
    assert torch.allclose(rectified_sigmoid(rectified_sigmoid_inverse(h)), h, atol=1e-6)
    q = AdaRoundWeightQuantizer(bits=4, init="minmax")
    q.bind_weight(torch.randn(2, 3))
    with torch.no_grad():
        q.logits.copy_(torch.tensor([[50.0, -50.0, 0.0], [0.0, 0.0, 50.0]]))
    # h = 1 or 0 costs nothing, h = 0.5 costs 1 per element: 3 elements at 0.5
    assert q.rounding_loss(2.0).item() == pytest.approx(3.0)
    assert q.rounding_loss(20.0).item() == pytest.approx(3.0)


def test_adaround_starts_at_round_to_nearest_and_soft_reproduces_the_weight():
    torch.manual_seed(0)
    w = torch.randn(4, 2, 3, 3)
    q = AdaRoundWeightQuantizer(bits=3, init="minmax")
    q.bind_weight(w)
    lo, hi = torch.aminmax(w.reshape(4, -1), dim=1)
    rtn = fake_quant(w, lo.view(4, 1, 1, 1), hi.view(4, 1, 1, 1), 3)
    assert torch.allclose(q(w), rtn, atol=1e-6)
    codes, scale, zero_point = q.codes(w)
    assert torch.allclose(scale * (codes + zero_point), q(w))
    assert codes.min() >= -4 and codes.max() <= 3
    q.soft = True  # floor + frac(w / s0) is w / s0 itself, inside the grid
    t = w / q.floor_scale - q.zero_point
    inside = (t >= -4) & (t <= 3)
    assert inside.float().mean() > 0.8
    assert torch.allclose(q(w)[inside], w[inside], atol=1e-5)
    q(w).sum().backward()
    assert q.logits.grad is not None and q.scale.grad is not None
    assert q.logits.grad.abs().sum() > 0


def test_adaround_hard_rounding_follows_the_logit_sign_and_gives_no_logit_gradient():
    w = torch.tensor([[0.26, 0.74, -0.5, 1.0]])
    q = AdaRoundWeightQuantizer(bits=4, init="minmax")
    q.bind_weight(w)
    with torch.no_grad():
        q.logits.fill_(5.0)  # round every element up
    s, z = q.floor_scale, q.zero_point
    want = q.scale * ((w / s).floor() - z + 1).clamp(-8, 7).add(z)
    assert torch.allclose(q(w), want)
    q(w).sum().backward()
    assert q.logits.grad is None or q.logits.grad.abs().sum() == 0


def test_quantize_binds_adaround_to_every_layer():
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    quantizers = {"weight_quantizer": AdaRoundWeightQuantizer, "act_quantizer": LSQActQuantizer}
    cfg = QuantConfig(w_bits=4, a_bits=4, policy="layer_inputs", **quantizers)
    q = quantize_(model, cfg, torch.randn(2, 1, 6, 6))
    assert q[0].weight_quant.logits.shape == q[0].weight.shape
    assert q[3].weight_quant.scale.shape == (3, 1)


def test_lsq_observes_sign_and_mean_step_then_matches_eq14_when_frozen():
    q = LSQActQuantizer(bits=4, init="minmax")
    a, b = torch.tensor([0.0, 1.5, 3.0]), torch.tensor([0.0, 4.5])
    q(a)
    q(b)
    assert not q.signed
    assert q.scale.item() == pytest.approx((3.0 / 15 + 4.5 / 15) / 2)
    assert q.lo.item() == 0.0 and q.hi.item() == pytest.approx(15 * q.scale.item())
    q.mode = "frozen"
    x = torch.linspace(-1, 6, 50)
    assert torch.allclose(q(x), fake_quant(x, q.lo, q.hi, 4), atol=1e-6)
    s = LSQActQuantizer(bits=3, init="minmax")
    s(torch.tensor([-2.0, 1.0]))
    assert s.signed and s.lo.item() == pytest.approx(-4 * s.scale.item())


def test_lsq_step_size_gradient_is_the_rounding_error_inside_and_the_bound_outside():
    q = LSQActQuantizer(bits=2, init="minmax")
    q(torch.tensor([0.0, 3.0]))  # unsigned, s = 1: codes 0..3
    q.mode = "frozen"
    with torch.no_grad():
        q.scale.fill_(0.5)
    x = torch.tensor([0.3, 0.8, 5.0], requires_grad=True)
    out = q(x)
    assert torch.allclose(out, torch.tensor([0.5, 1.0, 1.5]))
    out.sum().backward()
    # d/ds: round(x/s) - x/s inside (1 - 0.6, 2 - 1.6), c_max = 3 outside
    assert q.scale.grad.item() == pytest.approx((1 - 0.6) + (2 - 1.6) + 3)
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0]))


def test_qdrop_keeps_about_drop_prob_float_and_is_seeded():
    q = LSQActQuantizer(bits=2, init="minmax", drop_prob=0.5)
    q(torch.tensor([0.0, 3.0]))
    q.mode = "frozen"
    x = torch.full((10000,), 0.4)  # quantizes to 0
    q.learning = True
    q.rng = torch.Generator().manual_seed(1)
    first = q(x)
    kept = (first == x).float().mean().item()
    assert 0.47 < kept < 0.53
    q.rng = torch.Generator().manual_seed(1)
    assert torch.equal(q(x), first)
    q.learning = False
    assert torch.equal(q(x), torch.zeros_like(x))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="init must be"):
        AdaRoundWeightQuantizer(bits=4, init="max")
    with pytest.raises(ValueError, match="drop_prob must be in"):
        LSQActQuantizer(bits=4, drop_prob=1.5)
    with pytest.raises(RuntimeError, match="not bound to a weight"):
        AdaRoundWeightQuantizer(bits=4)(torch.randn(2, 2))
