import pytest
import torch

from dfqkit.quant import (
    EMAActQuantizer,
    LearnableClipActQuantizer,
    QuantConfig,
    fake_quant,
    learnable_fake_quant,
    quantize_,
    set_quant_mode,
)


def _reference(x, lo, hi, bits):
    """Independent formulation: Eq. 14 written with autograd ops and a rounding STE."""
    n = 2**bits - 1
    s = (hi - lo).clamp_min(1e-8) / n
    inv = 1 / s

    def round_ste(v):
        return v + (v.round() - v).detach()

    z = round_ste(lo * inv) + 2 ** (bits - 1)
    t = torch.clamp(x * inv - z, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return s * (round_ste(t) + z)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_forward_equals_eq14_and_gradients_equal_an_independent_formulation(bits):
    torch.manual_seed(bits)
    x = (torch.randn(4, 3, 5, 5) * 2).requires_grad_()
    w = torch.randn_like(x)
    lo = torch.tensor(-1.3, requires_grad=True)
    hi = torch.tensor(2.1, requires_grad=True)
    y = learnable_fake_quant(x, lo, hi, bits, grad_scale=False)
    assert torch.equal(y, fake_quant(x.detach(), lo.detach(), hi.detach(), bits))
    got = torch.autograd.grad((y * w).sum(), (x, lo, hi))
    want = torch.autograd.grad((_reference(x, lo, hi, bits) * w).sum(), (x, lo, hi))
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_bound_gradients_by_hand():
    lo, hi = torch.tensor(0.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    # 2 bits: s = 1, z = 2, codes -2..1 → grid {0, 1, 2, 3}
    x = torch.tensor([5.0, 1.25, -1.0])
    y = learnable_fake_quant(x, lo, hi, 2, grad_scale=False)
    torch.testing.assert_close(y, torch.tensor([3.0, 1.0, 0.0]))
    y[0].backward()  # clipped at the top: ∂/∂hi = (q + z - lo/s)/3 = (1 + 2)/3 = 1, ∂/∂lo = 0
    torch.testing.assert_close((lo.grad, hi.grad), (torch.tensor(0.0), torch.tensor(1.0)))
    lo.grad = hi.grad = None
    learnable_fake_quant(x, lo, hi, 2, grad_scale=False)[1].backward()
    # inside: ∂out/∂s = q - t = -1 - (-0.75) = -0.25 → ∂/∂hi = -0.25/3, ∂/∂lo = +0.25/3
    torch.testing.assert_close(
        (lo.grad, hi.grad), (torch.tensor(0.25 / 3), torch.tensor(-0.25 / 3))
    )
    lo.grad = hi.grad = None
    learnable_fake_quant(x, lo, hi, 2, grad_scale=False)[2].backward()
    # clipped at the bottom: ∂/∂lo = 1 - (q + z - lo/s)/3 = 1 - 0 = 1, ∂/∂hi = 0
    torch.testing.assert_close((lo.grad, hi.grad), (torch.tensor(1.0), torch.tensor(0.0)))


def test_values_exactly_on_the_grid_ends_count_as_inside():
    """LSQ's convention: a code exactly at qmin or qmax (a post-ReLU zero with lo = 0, a
    value at hi) is inside: its gradient reaches x and it pushes no bound as a clipped one."""
    lo, hi = torch.tensor(0.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    x = torch.tensor([0.0, 3.0, 3.0001, -0.0001], requires_grad=True)  # 2 bits: s = 1, z = 2
    y = learnable_fake_quant(x, lo, hi, 2, grad_scale=False)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    # only the two clipped values move the bounds: above, d/dhi = 1; below, d/dlo = 1
    torch.testing.assert_close((lo.grad, hi.grad), (torch.tensor(1.0), torch.tensor(1.0)))


@pytest.mark.parametrize("bits", [3, 8])
def test_bound_gradients_of_a_large_tensor_match_float64(bits):
    """The backward sums over every element: on an activation-sized tensor its float32 sums
    stay within 1e-4 of the same sums in float64."""
    torch.manual_seed(bits)
    x = torch.randn(16, 16, 28, 28).relu_()
    w = torch.randn_like(x)
    lo = torch.tensor(0.0, requires_grad=True)
    hi = torch.tensor(1.7, requires_grad=True)
    (learnable_fake_quant(x, lo, hi, bits, grad_scale=False) * w).sum().backward()
    n = 2**bits - 1
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = 1.7 / n
    z = 0 - qmin  # round(lo / s) - qmin with lo = 0
    t = x.double() / s - z
    inside = (t >= qmin) & (t <= qmax)
    q = t.clamp(qmin, qmax).round()
    ds = torch.where(inside, q - t, q + z)
    g_s = (w.double() * ds).sum()
    g_out = (w.double() * ~inside).sum()
    want = (g_out - g_s / n, g_s / n)
    torch.testing.assert_close(lo.grad.double(), want[0].reshape(()), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(hi.grad.double(), want[1].reshape(()), rtol=1e-4, atol=1e-3)


def test_grad_scale_is_lsq_per_sample_features():
    x = torch.randn(8, 2, 3, 3) * 3
    lo, hi = torch.tensor(-1.0, requires_grad=True), torch.tensor(1.0, requires_grad=True)
    learnable_fake_quant(x, lo, hi, 4, grad_scale=False).sum().backward()
    plain = hi.grad.clone()
    hi.grad = None
    learnable_fake_quant(x, lo, hi, 4, grad_scale=True).sum().backward()
    torch.testing.assert_close(hi.grad, plain / (18 * 15) ** 0.5)


def test_observes_like_ema_then_learns_its_bounds():
    torch.manual_seed(0)
    q = LearnableClipActQuantizer(bits=3, momentum=0.9, grad_scale=True)
    ref = EMAActQuantizer(bits=3, momentum=0.9)
    for _ in range(5):
        x = torch.rand(4, 8) * 6
        torch.testing.assert_close(q(x), ref(x))
    torch.testing.assert_close((q.lo.detach(), q.hi.detach()), (ref.lo, ref.hi))
    assert isinstance(q.lo, torch.nn.Parameter) and {"lo", "hi", "num_updates"} <= set(
        q.state_dict()
    )
    q.mode = "frozen"
    opt = torch.optim.SGD(q.parameters(), lr=0.5)
    before = q.hi.detach().clone()
    x = torch.full((4, 8), 100.0)
    for _ in range(3):  # the quantization error of inputs clipped far above hi lifts hi
        opt.zero_grad()
        (q(x) - x).square().sum().backward()
        opt.step()
    assert q.hi.item() > before.item() + 1.0


def test_trainer_gives_clip_bounds_their_own_parameter_group():
    from functools import partial

    from dfqkit.build import student_optimizer_groups
    from dfqkit.models.mnist_resnet import mnist_resnet

    model = mnist_resnet(depth=8, weights=None)
    cfg = QuantConfig(w_bits=4, a_bits=4, act_quantizer=partial(LearnableClipActQuantizer, lr=0.01))
    student = quantize_(model, cfg, torch.randn(2, 1, 28, 28))
    set_quant_mode(student, "observe")
    opt = student_optimizer_groups(partial(torch.optim.SGD, lr=1e-4, weight_decay=1e-4), student)
    main, clips = opt.param_groups
    assert clips["lr"] == pytest.approx(0.01) and clips["weight_decay"] == 0.0
    assert main["lr"] == pytest.approx(1e-4) and main["weight_decay"] == 1e-4
    n_quant = sum(isinstance(m, LearnableClipActQuantizer) for m in student.modules())
    assert len(clips["params"]) == 2 * n_quant
    assert len(main["params"]) + len(clips["params"]) == len(list(student.parameters()))


def test_a_nonnegative_lower_bound_can_be_held_so_zero_stays_on_the_grid():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(64, 32)) * 2  # post-ReLU: observed lo = 0
    signed = torch.randn(64, 32)  # observed lo < 0
    for lower, lo_moves in (("learned", True), ("fixed_if_nonnegative", False)):
        q = LearnableClipActQuantizer(bits=3, lower=lower)
        q(x)
        q.mode = "frozen"
        assert q.lo.item() == 0.0
        opt = torch.optim.SGD(q.parameters(), lr=0.05, momentum=0.9)
        hi0 = q.hi.item()
        for _ in range(20):  # the rounding-error gradient pushes a learned lo above 0
            opt.zero_grad()
            (q(x) - x.round()).square().sum().backward()
            opt.step()
        assert (q.lo.item() != 0.0) is lo_moves
        assert q.hi.item() != hi0  # the upper bound trains in both
        if not lo_moves:  # held exactly: zero is a grid point, the forward is plain Eq. 14
            torch.testing.assert_close(q(x), fake_quant(x, q.lo.detach(), q.hi.detach(), 3))
    # a negative lower bound (a signed activation) still trains
    q = LearnableClipActQuantizer(bits=3, lower="fixed_if_nonnegative")
    q(signed)
    q.mode = "frozen"
    lo0 = q.lo.item()
    assert lo0 < 0
    (q(signed) - signed * 3).square().sum().backward()
    assert q.lo.grad is not None and q.lo.grad.item() != 0.0
    with pytest.raises(ValueError, match="lower must be one of"):
        LearnableClipActQuantizer(bits=3, lower="pact")
