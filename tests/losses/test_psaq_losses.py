import math

import numpy as np
import pytest
import torch

from dfqkit.losses import PatchSimilarityEntropy, TVPrior
from dfqkit.losses.patch_similarity import kde_entropy
from dfqkit.losses.tv_prior import total_variation
from dfqkit.step import Step, SynthBatch


def _direct_entropy(v, h=0.01, points=10):
    """Independent: explicit loops over grid points and samples, trapezoid by hand (float64)."""
    v = np.asarray(v, dtype=np.float64)
    grid = np.linspace(v.min(), v.max(), points)
    dens = []
    for g in grid:
        s = 0.0
        for x in v:
            s += math.exp(-((g - x) ** 2) / (2 * h * h)) / (h * math.sqrt(2 * math.pi))
        dens.append(s / len(v))
    f = [p * math.log(max(p, 1e-12)) for p in dens]
    dx = grid[1] - grid[0]
    return -sum(dx * (f[i] + f[i + 1]) / 2 for i in range(points - 1))


@pytest.mark.parametrize("h", [0.01, 0.1])
def test_kde_entropy_matches_a_direct_numerical_computation(h):
    torch.manual_seed(0)
    values = torch.rand(3, 40) * 0.5 + 0.2
    got = kde_entropy(values, bandwidth=h)
    want = [_direct_entropy(row.tolist(), h) for row in values]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4)


def test_kde_entropy_of_a_wide_gaussian_sample_is_near_the_closed_form():
    # many samples of N(0, 0.3²) and a bandwidth << σ: H ≈ ½ log(2πe σ²), on ±3.5σ support
    torch.manual_seed(0)
    sigma = 0.3
    values = torch.randn(1, 20000) * sigma
    got = kde_entropy(values, bandwidth=0.02, points=200)
    assert got.item() == pytest.approx(0.5 * math.log(2 * math.pi * math.e * sigma**2), abs=0.02)


def test_patch_similarity_entropy_drops_the_cls_token_and_sums_blocks():
    torch.manual_seed(0)
    out = torch.randn(2, 3, 5, 4)  # (b, heads, tokens, head_dim)
    batch = SynthBatch(labels=torch.zeros(2, dtype=torch.long))
    step = Step(batch, torch.zeros(2, 3), teacher_taps={"attention": [out, out * 2]})
    loss = PatchSimilarityEntropy(prefix_tokens=1)(step)
    tokens = torch.nn.functional.normalize(out.mean(1)[:, 1:], dim=-1)
    sims = (tokens @ tokens.transpose(1, 2)).flatten(1)
    one_block = kde_entropy(sims).mean()
    torch.testing.assert_close(loss, -2 * one_block)  # a rescaled block has the same cosines


def test_total_variation_by_hand_and_prior_target_range():
    x = torch.tensor([[[[0.0, 1.0], [3.0, 1.0]]]])  # |3-0| + |1-1| + |1-0| + |1-3| = 6
    assert total_variation(x).item() == 6.0
    batch = SynthBatch(labels=torch.zeros(1, dtype=torch.long), images=x)
    step = Step(batch, torch.zeros(1, 2))
    prior = TVPrior(low=10.0, high=10.0, scale_to_image=False, weight=1.0)
    assert prior(step).item() == pytest.approx(4.0)  # |6 - 10|
    scaled = TVPrior(low=10.0, high=10.0, weight=1.0)(step)
    factor = 1 * (2 * 1 + 2 * 1) / (3 * 2 * 224 * 223)
    assert scaled.item() == pytest.approx(abs(6 - 10 * factor))
    with pytest.raises(ValueError, match="low <= high"):
        TVPrior(low=3.0, high=2.0)
