"""DSG's QAT losses against hand computations and an independent (numpy) eigendecomposition."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfqkit.losses import DSGSlackBNSLoss, EigenStructureLoss
from dfqkit.step import Step, SynthBatch


def _step(images=None, taps=None):
    b = 4 if images is None else images.shape[0]
    labels = torch.zeros(b, dtype=torch.long)
    batch = SynthBatch(labels=labels, targets=F.one_hot(labels, 3).float(), images=images)
    step = Step(batch, torch.zeros(b, 3), torch.zeros(b, 3))
    step.teacher_taps = taps or {}
    return step


def _bn(mean, var):
    bn = nn.BatchNorm2d(len(mean))
    bn.running_mean.copy_(torch.tensor(mean))
    bn.running_var.copy_(torch.tensor(var))
    return bn


def test_slack_bns_by_hand_both_margin_modes_and_the_layer_enhancement():
    # one layer, 2 channels, 2 samples x 1 x 2 positions: P = 4 positions per channel
    x = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]], [[[1.0, 3.0]], [[2.0, 2.0]]]])
    bn = _bn([1.0, 0.0], [4.0, 1.0])
    # batch stats: channel 0 mean 2, var 1; channel 1 mean 1, var 1
    # margins: m = 1.645 σ / √4, n = 1.645 σ² √(2/3)
    m = [1.645 * 2 / 2, 1.645 * 1 / 2]
    n = [1.645 * 4 * math.sqrt(2 / 3), 1.645 * 1 * math.sqrt(2 / 3)]
    dm, dv = [1.0, 1.0], [3.0, 0.0]
    step = _step(taps={"bn_inputs": [(x, bn)]})

    def expected(gap, factor0):
        g = [gap(dm[c], m[c]) for c in range(2)] + [gap(dv[c], n[c]) for c in range(2)]
        g[0] *= factor0  # layer 0: channel 0 of both gaps
        g[2] *= factor0
        return sum(v * v for v in g)

    dist = DSGSlackBNSLoss(weight=0.1)(step)
    assert dist.item() == pytest.approx(0.1 * expected(lambda d, k: abs(d - k), math.sqrt(2)))
    hinge = DSGSlackBNSLoss(margin_mode="hinge", enhancement=1.0)(step)
    assert hinge.item() == pytest.approx(expected(lambda d, k: max(d - k, 0.0), 1.0))
    # the second layer enhances its channel 1; the mean is over layers
    two = DSGSlackBNSLoss(margin_mode="hinge", enhancement=3.0, slack=0.0)
    step2 = _step(taps={"bn_inputs": [(x, bn), (x, bn)]})
    plain = [dm[0] ** 2, dm[1] ** 2, dv[0] ** 2, dv[1] ** 2]
    layer0 = 9 * plain[0] + plain[1] + 9 * plain[2] + plain[3]
    layer1 = plain[0] + 9 * plain[1] + plain[2] + 9 * plain[3]
    assert two(step2).item() == pytest.approx((layer0 + layer1) / 2)


def test_eigen_structure_loss_matches_numpy_and_has_gradients():
    torch.manual_seed(0)
    images = torch.randn(6, 1, 4, 4, requires_grad=True)
    bn = _bn([0.0], [1.0])
    step = _step(images, {"bn_inputs": [(images, bn), (images, bn)]})
    torch.manual_seed(1)
    got = EigenStructureLoss(weight=2.0)(step)
    torch.manual_seed(1)
    noise = torch.randn(6, 1, 4, 4)

    def spectrum(a):
        phi = a.reshape(len(a), -1)
        phi = phi / np.linalg.norm(phi, axis=1, keepdims=True)
        vals, vecs = np.linalg.eigh(phi @ phi.T)
        peak = np.abs(vecs).argmax(axis=0)
        return vals, vecs * np.sign(vecs[peak, np.arange(len(vals))])

    vals, vecs = spectrum(images.detach().double().numpy())
    ref_vals, ref_vecs = spectrum(noise.double().numpy())
    w = (ref_vals - ref_vals.min()) / (ref_vals.max() - ref_vals.min())
    want = 1e-4 * np.mean((vals - ref_vals) ** 2) + abs(np.sum(w * -(vecs * ref_vecs).sum(0)))
    # weight 2, divided by the 2 BN layers
    assert got.item() == pytest.approx(2.0 * want / 2, rel=1e-4)
    got.backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="margin_mode"):
        DSGSlackBNSLoss(margin_mode="soft")
    with pytest.raises(ValueError, match="slack"):
        DSGSlackBNSLoss(slack=-1)
    with pytest.raises(ValueError, match="magnitude"):
        EigenStructureLoss(magnitude=-1)
