"""The AutoReCon generator: the released searches build, run at any size, take soft targets, and
a switched-off edge or cross link contributes exactly zero."""

import pytest
import torch

from dfqkit.generators import ARCGenerator, synthesize
from dfqkit.generators.arc_generator import ARCHITECTURES
from dfqkit.mixers import EmbeddingMixup, NoMixer


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_released_searches_generate_normalized_images_with_gradients(arch):
    torch.manual_seed(0)
    gen = ARCGenerator(num_classes=10, image_size=16, channels=3, latent_dim=12, arch=arch, width=8)
    batch = synthesize(gen, NoMixer(), 4, torch.device("cpu"))
    assert batch.images.shape == (4, 3, 16, 16) and torch.isfinite(batch.images).all()
    # the output BN (no affine, batch statistics) leaves each channel at mean 0, variance 1
    torch.testing.assert_close(batch.images.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    batch.images.square().sum().backward()
    assert all(p.grad is not None for p in gen.inputs.parameters())


def test_sizes_not_divisible_by_8_are_centre_cropped_and_soft_targets_work():
    gen = ARCGenerator(num_classes=10, image_size=28, channels=1, latent_dim=12, width=8)
    assert gen.full == 32
    mixed = synthesize(gen, EmbeddingMixup(num_classes=10, prob=1.0), 4, torch.device("cpu"))
    assert mixed.images.shape == (4, 1, 28, 28)
    assert not torch.allclose(mixed.targets.max(1).values, torch.ones(4))  # really soft


def test_switched_off_links_contribute_zero_and_the_encoding_is_checked():
    # cifar10's first cell: edge 1 is "none" (index 0); its output is zero for any input
    gen = ARCGenerator(num_classes=3, image_size=8, channels=1, latent_dim=6, width=4)
    edge = gen.cells[0].edges[1]
    assert edge.kind == "none" and not list(edge.parameters())
    x = torch.randn(2, 4, 2, 2)
    assert torch.equal(edge(x, torch.eye(3)[:2]), torch.zeros_like(x))
    link = gen.cells[1].cross[0]  # cifar10 cross 0: "none"
    assert link.mode == "none" and link(x, torch.eye(3)[:2]).shape == (2, 4, 4, 4)
    with pytest.raises(ValueError, match=r"arch\['op'\] needs 15 indices"):
        ARCGenerator(num_classes=3, arch={"up": (0,) * 6, "op": (0,) * 14, "cross": (0,) * 12})
    with pytest.raises(ValueError, match="arch must be one of"):
        ARCGenerator(num_classes=3, arch="resnet101")
