import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dfqkit.losses import AdaptiveMarginLoss, DifferenceEntropyLoss
from dfqkit.step import Step, SynthBatch


def _step(f, q, labels):
    batch = SynthBatch(labels=labels, targets=F.one_hot(labels, f.shape[1]).float())
    return Step(batch, f, q)


def _numpy_margin(f, q, y, ll, lu, a_ds, a_as, beta):
    f, q = f.double().numpy(), q.double().numpy()
    b, c = f.shape

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    hs = []
    for i in range(b):
        p = softmax(f[i] - q[i])
        hs.append(-(p * np.log(p)).sum())
    hmin = min(hs)
    hn = [(h - hmin) / (math.log(c) - hmin) for h in hs]
    margin = np.mean([max(ll - h, 0) for h in hn]) + np.mean([max(h - lu, 0) for h in hn])
    ce_ds = np.mean([-np.log(softmax(f[i] - q[i])[y[i]]) for i in range(b)])
    ce_as = np.mean([-np.log(softmax(f[i] + q[i])[y[i]]) for i in range(b)])
    return margin + beta * (a_ds * ce_ds + a_as * ce_as)


def test_adaptive_margin_matches_a_per_sample_computation():
    torch.manual_seed(0)
    f, q = torch.randn(7, 5) * 3, torch.randn(7, 5) * 3
    y = torch.randint(0, 5, (7,))
    loss = AdaptiveMarginLoss(lambda_l=0.3, lambda_u=0.8, alpha_ds=0.2, alpha_as=0.1)
    want = _numpy_margin(f, q, y.numpy(), 0.3, 0.8, 0.2, 0.1, 1.0)
    assert loss(_step(f, q, y)).item() == pytest.approx(want, rel=1e-5)
    assert AdaptiveMarginLoss.needs_student


def test_the_gradient_flows_through_the_batch_minimum_as_released():
    """``detach_min=False`` (the released code): ∂L/∂q includes the path through ``min_b H``;
    checked against central finite differences of the value, which the detached variant
    does not match."""
    torch.manual_seed(1)
    f, y = torch.randn(6, 4) * 2, torch.randint(0, 4, (6,))
    q0 = torch.randn(6, 4) * 2  # the loss computes in fp32: finite differences of 1e-3
    loss = AdaptiveMarginLoss(lambda_l=0.6, lambda_u=0.7)  # most samples in a margin term

    def value(q):
        return loss(_step(f, q, y))

    q = q0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(value(q), q)
    numeric = torch.zeros_like(q0)
    for i in range(6):
        for j in range(4):
            e = torch.zeros_like(q0)
            e[i, j] = 1e-3
            numeric[i, j] = (value(q0 + e) - value(q0 - e)) / 2e-3
    torch.testing.assert_close(grad, numeric, rtol=1e-2, atol=2e-4)
    detached = AdaptiveMarginLoss(lambda_l=0.6, lambda_u=0.7, detach_min=True)
    q = q0.clone().requires_grad_(True)
    (grad_detached,) = torch.autograd.grad(detached(_step(f, q, y)), q)
    assert (grad_detached - numeric).abs().max() > 50 * 2e-4


def test_difference_entropy_by_hand():
    f = torch.tensor([[2.0, 0.0]])
    q = torch.tensor([[0.0, 0.0]])
    t = 2.0
    p = torch.tensor([2.0 / t, 0.0]).softmax(-1)
    want = -(t * t) * -(p * p.log()).sum()
    got = DifferenceEntropyLoss(temperature=t)(_step(f, q, torch.tensor([0])))
    torch.testing.assert_close(got, want)
    # equal logits up to a shift: maximal entropy log C, the minimum of the loss
    same = DifferenceEntropyLoss(temperature=t)(_step(f, f - 3.0, torch.tensor([0])))
    assert same.item() == pytest.approx(-(t * t) * math.log(2))


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="lambda_l <= lambda_u"):
        AdaptiveMarginLoss(lambda_l=0.9, lambda_u=0.8)
