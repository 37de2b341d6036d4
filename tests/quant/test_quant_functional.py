import pytest
import torch

from dfqkit.quant import MinMaxWeightQuantizer, fake_quant, minmax_qparams, quantize_codes


def test_codes_match_hand_computation():
    # k = 3: codes -4..3, n = 2^3 - 1 = 7.
    # row 0: lo = -0.9, hi = 1.2: s = 2.1 / 7 = 0.3, z = round(-0.9 / 0.3) + 4 = -3 + 4 = 1,
    #        q = round(w / 0.3 - 1) = round([-4, -1.67, 0, 3]) = [-4, -2, 0, 3],
    #        w_hat = 0.3 * (q + 1) = [-0.9, -0.3, 0.3, 1.2].
    # row 1: lo = -2.0, hi = 1.5: s = 3.5 / 7 = 0.5, z = round(-4) + 4 = 0,
    #        q = round(w / 0.5) = [-4, 0, 1, 3], w_hat = w.
    w = torch.tensor([[-0.9, -0.2, 0.3, 1.2], [-2.0, 0.0, 0.5, 1.5]])
    q, scale, zero_point = MinMaxWeightQuantizer(bits=3).codes(w)
    torch.testing.assert_close(scale, torch.tensor([[0.3], [0.5]]))
    torch.testing.assert_close(zero_point, torch.tensor([[1.0], [0.0]]))
    torch.testing.assert_close(q, torch.tensor([[-4.0, -2, 0, 3], [-4, 0, 1, 3]]))
    w_hat = torch.tensor([[-0.9, -0.3, 0.3, 1.2], [-2.0, 0.0, 0.5, 1.5]])
    torch.testing.assert_close(MinMaxWeightQuantizer(bits=3)(w), w_hat)
    torch.testing.assert_close(scale * (q + zero_point), w_hat)


def test_functional_codes_and_qparams_per_tensor():
    x = torch.tensor([-0.9, -0.2, 0.3, 1.2])
    scale, zero_point = minmax_qparams(x.min(), x.max(), 3)
    assert scale.item() == pytest.approx(0.3) and zero_point.item() == 1.0
    q = quantize_codes(torch.tensor([-5.0, 0.3, 5.0]), scale, zero_point, 3)
    torch.testing.assert_close(q, torch.tensor([-4.0, 0.0, 3.0]))  # clamped at both ends


def test_zero_is_exact_thanks_to_rounded_zero_point():
    x = torch.tensor([0.0, -0.37, 1.1, 0.0])
    out = fake_quant(x, torch.tensor(-0.37), torch.tensor(1.1), 4)
    assert out[0] == 0 and out[3] == 0


def test_16_bits_is_nearly_identity():
    x = torch.randn(1000) * 3
    lo, hi = x.min(), x.max()
    err = (fake_quant(x, lo, hi, 16) - x).abs().max()
    assert err < (hi - lo) / 2**15
    assert (fake_quant(x, lo, hi, 4) - x).abs().max() > 100 * err  # and 4 bits is not


def test_matches_torch_fused_fake_quant():
    x = torch.randn(64, 33)
    lo, hi, k = x.min(), x.max(), 4
    scale, zero_point = minmax_qparams(lo, hi, k)
    # torch's op uses unsigned codes 0..2^k-1 and x_hat = s * (q - zp): zp = 2^(k-1) - z.
    fused = torch.fake_quantize_per_tensor_affine(
        x, scale.item(), int(2 ** (k - 1) - zero_point.item()), 0, 2**k - 1
    )
    torch.testing.assert_close(fake_quant(x, lo, hi, k), fused)


def test_per_channel_beats_per_tensor_on_a_small_channel():
    w = torch.randn(2, 64)
    w[0] *= 0.01  # a small-range channel next to a large one
    per_channel = MinMaxWeightQuantizer(bits=4, per_channel=True)(w)
    per_tensor = MinMaxWeightQuantizer(bits=4, per_channel=False)(w)
    err_channel = (per_channel[0] - w[0]).abs().max()
    err_tensor = (per_tensor[0] - w[0]).abs().max()
    assert err_channel < err_tensor / 5
    # per tensor, the small channel is crushed onto a few codes around 0
    assert per_tensor[0].unique().numel() <= 3 < per_channel[0].unique().numel()


@pytest.mark.parametrize("shape", [(4, 3, 2, 2), (4, 5)])
def test_weight_ranges_are_per_output_channel(shape):
    w = torch.randn(shape)
    _, scale, _ = MinMaxWeightQuantizer(bits=8).codes(w)
    assert scale.shape == (4,) + (1,) * (len(shape) - 1)
    flat = w.reshape(4, -1)
    torch.testing.assert_close(scale.flatten(), (flat.amax(1) - flat.amin(1)) / 255)


def test_identity_and_clipped_ste_gradients():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    lo, hi = torch.tensor(-1.0), torch.tensor(1.0)
    grad_out = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    fake_quant(x, lo, hi, 4, ste="identity").backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out)
    x.grad = None
    fake_quant(x, lo, hi, 4, ste="clipped").backward(grad_out)
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 0.0]))


def test_fp32_under_bf16_autocast():
    x = torch.randn(8, 16)
    lo, hi = x.min(), x.max()
    expected = fake_quant(x, lo, hi, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fake_quant(x, lo, hi, 8)
        out_bf16_in = fake_quant(x.bfloat16(), lo, hi, 8)
    assert out.dtype == torch.float32 and out_bf16_in.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(out_bf16_in, fake_quant(x.bfloat16().float(), lo, hi, 8))


def test_bf16_input_gets_bf16_gradient():
    x = torch.randn(8, requires_grad=True, dtype=torch.bfloat16)
    fake_quant(x, torch.tensor(-1.0), torch.tensor(1.0), 4).sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="ste must be one of 'identity', 'clipped', got 'clip'"):
        fake_quant(torch.zeros(2), torch.tensor(0.0), torch.tensor(1.0), 4, ste="clip")
    with pytest.raises(ValueError, match="bits must be in 2..16, got 1"):
        MinMaxWeightQuantizer(bits=1)
