import math

import numpy as np
import pytest
import torch

from dfqkit.losses import SimLoss1, SimLoss2
from dfqkit.step import Step, SynthBatch


def _step(teacher_taps=None, student_taps=None):
    batch = SynthBatch(labels=torch.zeros(2, dtype=torch.long))
    return Step(batch, torch.zeros(2, 3), torch.zeros(2, 3), teacher_taps or {}, student_taps or {})


def test_simloss1_orthogonal_features_by_hand():
    # n one-hot features: centroid = 1/n · ones, cos(e_i, centroid) = 1/sqrt(n)
    n = 4
    loss = SimLoss1()(_step({"stages": {1: [torch.eye(n)]}}))
    torch.testing.assert_close(loss, torch.tensor(1 / math.sqrt(n)))
    # identical samples: every cosine is 1
    same = torch.ones(5, 3)
    torch.testing.assert_close(SimLoss1()(_step({"stages": {1: [same]}})), torch.tensor(1.0))


def test_simloss1_matches_a_per_sample_numpy_loop_and_averages_parts():
    torch.manual_seed(0)
    feats = [torch.rand(6, 5), torch.rand(6, 7)]

    def numpy_value(a):
        a = a.numpy().astype(np.float64)
        c = a.mean(0)
        return np.mean([a[i] @ c / np.linalg.norm(a[i]) / np.linalg.norm(c) for i in range(6)])

    want = (numpy_value(feats[0]) + numpy_value(feats[1])) / 2
    got = SimLoss1(parts=2, weight=1.0)(_step({"stages": {2: feats}}))
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert SimLoss1(parts=2).needs == {"stages"} and SimLoss1(parts=2).stage_parts == 2


def test_simloss1_gradient_spreads_samples():
    a = torch.tensor([[1.0, 0.1], [1.0, 0.2]], requires_grad=True)
    SimLoss1()(_step({"stages": {1: [a]}})).backward()
    # descending the gradient moves the two samples apart along the second axis
    assert a.grad[0, 1] > 0 > a.grad[1, 1]


def test_simloss2_channel_profiles_by_hand():
    # teacher: per-channel batch means (1, 0); student (1, 1) → 1 - cos = 1 - 1/sqrt(2)
    t = torch.zeros(2, 2, 3, 3)
    t[:, 0] = 1.0
    s = torch.ones(2, 2, 3, 3)
    value = SimLoss2()(_step({"activations": [t, t]}, {"activations": [s, t]}))
    torch.testing.assert_close(value, torch.tensor((1 - 1 / math.sqrt(2)) / 2))
    tokens = torch.randn(2, 4, 6)
    same = SimLoss2()(_step({"activations": [tokens]}, {"activations": [tokens * 3]}))
    assert same.abs().item() < 1e-6  # a scaled profile is aligned


def test_simloss2_gradient_reaches_the_student_only():
    t = torch.rand(3, 4, 2, 2, requires_grad=True)
    s = torch.rand(3, 4, 2, 2, requires_grad=True)
    SimLoss2()(_step({"activations": [t]}, {"activations": [s]})).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    assert SimLoss2().side == "student"


def test_simloss2_refuses_unpaired_layers():
    x = torch.rand(2, 3, 2, 2)
    with pytest.raises(ValueError, match="teacher produced 2 and the student 1"):
        SimLoss2()(_step({"activations": [x, x]}, {"activations": [x]}))


def test_simloss1_parts_validated():
    with pytest.raises(ValueError, match="parts must be an integer >= 1"):
        SimLoss1(parts=0)
