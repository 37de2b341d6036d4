import pytest
import torch
import torch.nn.functional as F

from dfqkit.generators import ConditionalGenerator, synthesize
from dfqkit.mixers import NoMixer


def test_shapes_and_normalized_output():
    torch.manual_seed(0)
    gen = ConditionalGenerator(num_classes=10, image_size=28, channels=1, latent_dim=16)
    batch = synthesize(gen, NoMixer(), 8, torch.device("cpu"))
    assert batch.images.shape == (8, 1, 28, 28)
    assert batch.targets.shape == (8, 10)
    torch.testing.assert_close(batch.targets, F.one_hot(batch.labels, 10).float())
    # the last BN (affine=False, train mode) normalizes each channel over the batch
    assert batch.images.mean().abs() < 1e-5
    assert (batch.images.var(unbiased=False) - 1).abs() < 1e-2


def test_embed_mul_is_label_embedding_times_z():
    gen = ConditionalGenerator(num_classes=4, image_size=8, channels=3, latent_dim=6)
    labels, z = torch.tensor([0, 3]), torch.randn(2, 6)
    torch.testing.assert_close(gen.embed(labels, z), gen.label_emb.weight[labels] * z)


def test_gdfq_eps_quirk_and_validation():
    gen = ConditionalGenerator(num_classes=3, image_size=8, channels=3)
    assert gen.bn1.eps == 0.8 and gen.bn2.eps == 0.8 and gen.bn0.eps == 1e-5
    with pytest.raises(ValueError, match="image_size must be an int >= 4, got 3"):
        ConditionalGenerator(num_classes=3, image_size=3)
    with pytest.raises(ValueError, match="conditioning must be one of"):
        ConditionalGenerator(num_classes=3, image_size=8, conditioning="concat")


def test_size_not_a_multiple_of_4_is_the_centre_of_the_next_multiple():
    # 30 = 4·8 - 2: the same seed (8 × 8) as a 32-pixel generator; the 32-pixel map is cut to
    # its centre 30 × 30 before the last conv, so away from the border (where the 3×3 conv's
    # zero padding now lands) the image equals the 32-pixel generator's, shifted by one pixel
    torch.manual_seed(0)
    big = ConditionalGenerator(num_classes=3, image_size=32, latent_dim=6).eval()
    small = ConditionalGenerator(num_classes=3, image_size=30, latent_dim=6).eval()
    small.load_state_dict(big.state_dict())
    batch = synthesize(big, NoMixer(), 2, torch.device("cpu"))
    with torch.no_grad():
        out_big, out_small = big.decode(batch), small.decode(batch)
    assert out_small.shape == (2, 3, 30, 30)
    torch.testing.assert_close(out_small[..., 1:-1, 1:-1], out_big[..., 2:-2, 2:-2])
    assert not torch.allclose(out_small[..., 0, :], out_big[..., 1, 1:-1])  # padding differs


def test_cbn_blends_class_affines_by_soft_targets():
    torch.manual_seed(0)
    gen = ConditionalGenerator(num_classes=3, image_size=8, channels=3, conditioning="cbn")
    with torch.no_grad():
        gen.bn0.gamma.copy_(torch.randn(3, 128))
        gen.bn0.beta.copy_(torch.randn(3, 128))
    x = torch.randn(4, 128, 2, 2)
    soft = torch.tensor([[0.5, 0.5, 0.0]] * 4)
    hard = [F.one_hot(torch.full((4,), c), 3).float() for c in (0, 1)]
    gen.bn0.eval()  # running statistics: the affine is the only per-sample difference
    mixed = gen.bn0(x, soft)
    torch.testing.assert_close(mixed, 0.5 * gen.bn0(x, hard[0]) + 0.5 * gen.bn0(x, hard[1]))
    batch = synthesize(gen, NoMixer(), 4, torch.device("cpu"))
    assert batch.images.shape == (4, 3, 8, 8)
    torch.testing.assert_close(batch.cond, batch.z)


@pytest.mark.parametrize("bias", [True, False])
def test_upsample_conv_equals_upsample_then_conv(bias):
    from torch import nn

    from dfqkit.generators.upsample_conv import UpsampleConv2d

    torch.manual_seed(0)
    fused = UpsampleConv2d(5, 7, bias=bias)
    plain = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(5, 7, 3, padding=1, bias=bias))
    plain[1].load_state_dict(fused.state_dict())
    x = torch.randn(3, 5, 4, 6, requires_grad=True)
    y1, y2 = fused(x), plain(x)
    assert y1.shape == (3, 7, 8, 12)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y1)
    g1 = torch.autograd.grad(y1, [x, fused.weight], g)
    g2 = torch.autograd.grad(y2, [x, plain[1].weight], g)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_real_data_reference_sampling_resumes_from_state_dict():
    from dfqkit.data import digits
    from dfqkit.generators import RealDataReference

    data = digits()
    a = RealDataReference(data=data, seed=3)
    a.sample(4, torch.device("cpu"))
    state = a.state_dict()
    expected = a.sample(4, torch.device("cpu")).labels
    b = RealDataReference(data=data, seed=99)
    b.load_state_dict(state)
    assert torch.equal(b.sample(4, torch.device("cpu")).labels, expected)
    assert not b.trainable
