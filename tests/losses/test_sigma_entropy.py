"""The entropy floor on the attention mixer's σ: value, gradient, and the start-up check."""

import math

import pytest
import torch

from dfqkit.losses import SigmaEntropyFloor
from dfqkit.step import Step, SynthBatch


def _step(sigma, mixed):
    batch = SynthBatch(labels=torch.zeros(sigma.shape[0], dtype=torch.long))
    batch = batch.replace(mix={"sigma": sigma, "mixed": mixed})
    return Step(batch=batch, teacher_logits=torch.zeros(sigma.shape[0], 3))


def test_value_is_the_mean_hinge_over_mixed_samples_hand_computed():
    sigma = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.97, 0.01, 0.01, 0.01], [1.0, 0.0, 0.0, 0.0]])
    mixed = torch.tensor([True, True, False])  # the third is unmixed: not counted
    loss = SigmaEntropyFloor(floor=0.5)
    h1 = -(0.97 * math.log(0.97) + 3 * 0.01 * math.log(0.01))  # 0.1677
    # sample 0 is uniform (H = log 4 > 0.5 log 4: no penalty); sample 1 is below the floor
    want = (0 + (0.5 * math.log(4) - h1)) / 2
    assert loss.compute(_step(sigma, mixed)).item() == pytest.approx(want, rel=1e-5)
    assert SigmaEntropyFloor(floor=0.0).compute(_step(sigma, mixed)).item() == 0.0
    none_mixed = SigmaEntropyFloor().compute(_step(sigma, torch.zeros(3, dtype=torch.bool)))
    assert none_mixed.item() == 0.0


def test_its_gradient_spreads_a_collapsed_sigma():
    logits = torch.tensor([[4.0, 0.0, 0.0]], requires_grad=True)
    sigma = logits.softmax(-1)
    entropy_before = -(sigma * sigma.log()).sum().item()
    SigmaEntropyFloor(floor=0.9).compute(_step(sigma, torch.tensor([True]))).backward()
    with torch.no_grad():
        stepped = (logits - 1.0 * logits.grad).softmax(-1)
    assert -(stepped * stepped.log()).sum().item() > entropy_before
    assert logits.grad[0, 0] > 0  # the dominant class's logit goes down


def test_bad_floor_and_a_batch_without_sigma_are_refused():
    with pytest.raises(ValueError, match=r"floor must be a number in \[0, 1\], got 1.5"):
        SigmaEntropyFloor(floor=1.5)
    batch = SynthBatch(labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="MultiLayerAttentionMixer"):
        SigmaEntropyFloor().compute(Step(batch=batch, teacher_logits=torch.zeros(2, 3)))
