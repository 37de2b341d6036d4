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


def _relative_l2_by_loops(teacher, student):
    """Independent formulation: per channel, every value gathered by hand (positions of a CNN
    map, tokens of a ViT layer), population mean and std in float64, then the two relative L2
    distances averaged; layers averaged."""

    def moments(a):
        a = a.double()
        channels = a.shape[1] if a.dim() == 4 else a.shape[-1]
        means, stds = [], []
        for ch in range(channels):
            values = a[:, ch].flatten() if a.dim() == 4 else a[..., ch].flatten()
            values = [v.item() for v in values]
            mu = sum(values) / len(values)
            means.append(mu)
            stds.append(math.sqrt(sum((v - mu) ** 2 for v in values) / len(values)))
        return means, stds

    def rel(x, y):
        num = math.sqrt(sum((a - b) ** 2 for a, b in zip(x, y, strict=True)))
        return num / math.sqrt(sum(b * b for b in y))

    total = 0.0
    for p, q in zip(teacher, student, strict=True):
        (mp, sp), (mq, sq) = moments(p), moments(q)
        total += 0.5 * (rel(mq, mp) + rel(sq, sp))
    return total / len(teacher)


def test_simloss2_relative_l2_matches_a_per_channel_loop():
    torch.manual_seed(0)
    teacher = [torch.rand(3, 4, 2, 2), torch.randn(2, 5, 3)]  # a CNN map and ViT tokens
    student = [torch.rand(3, 4, 2, 2) * 1.5, torch.randn(2, 5, 3) + 0.3]
    got = SimLoss2(form="relative_l2")(_step({"activations": teacher}, {"activations": student}))
    assert got.item() == pytest.approx(_relative_l2_by_loops(teacher, student), rel=1e-5)
    same = SimLoss2(form="relative_l2")(_step({"activations": teacher}, {"activations": teacher}))
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_simloss2_relative_l2_sees_a_scaled_profile_cosine_does_not():
    torch.manual_seed(0)
    t = torch.rand(4, 3, 2, 2) + 0.5
    step = _step({"activations": [t]}, {"activations": [t * 3]})
    assert SimLoss2(form="cosine")(step).abs().item() < 1e-6  # aligned under cosine
    # means and stds are both 3× the teacher's: each relative distance is |3 - 1| = 2
    assert SimLoss2(form="relative_l2")(step).item() == pytest.approx(2.0, rel=1e-5)
    # a shift keeps the std: only the mean term moves
    shifted = _step({"activations": [t]}, {"activations": [t + 1.0]})
    mean = torch.full((3,), 1.0).norm() / t.mean((0, 2, 3)).norm()
    assert SimLoss2(form="relative_l2")(shifted).item() == pytest.approx(
        0.5 * mean.item(), rel=1e-4
    )


def test_simloss2_relative_l2_trains_the_learnable_clip_bounds():
    from dfqkit.quant import LearnableClipActQuantizer

    torch.manual_seed(0)
    quant = LearnableClipActQuantizer(bits=3, momentum=0.9)
    x = (torch.randn(4, 3, 5, 5) * 2).relu()
    quant(x)  # observe the range, then learn it
    quant.mode = "frozen"
    x.requires_grad_(True)
    t = torch.rand(4, 3, 5, 5)
    # a dead channel on both sides: the std's root stays differentiable
    x_dead = x.detach().clone()
    x_dead[:, 1] = 0.0
    x_dead.requires_grad_(True)
    for student_input in (x, x_dead):
        teacher = t.clone()
        teacher[:, 1] = 0.0 if student_input is x_dead else teacher[:, 1]
        quant.zero_grad()
        loss = SimLoss2(form="relative_l2")(
            _step({"activations": [teacher]}, {"activations": [quant(student_input)]})
        )
        loss.backward()
        assert torch.isfinite(student_input.grad).all() and student_input.grad.abs().sum() > 0
        assert quant.lo.grad is not None and quant.hi.grad is not None
        assert torch.isfinite(quant.hi.grad) and quant.hi.grad.abs() > 0


def test_simloss2_form_validated():
    with pytest.raises(ValueError, match="form must be one of"):
        SimLoss2(form="l2")
    assert "form='relative_l2'" in repr(SimLoss2(form="relative_l2"))
