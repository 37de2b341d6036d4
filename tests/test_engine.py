"""One iteration of the loop on tiny models: phases, reuse of the batch, no teacher gradients."""

import torch
from accelerate import Accelerator
from torch import nn

from dfqkit.engine import Engine, Phase
from dfqkit.generators import ConditionalGenerator
from dfqkit.losses import BNStatsLoss, KDLoss, SoftTargetCE
from dfqkit.mixers import NoMixer
from dfqkit.quant import QuantConfig, act_quantizers, quantize_, set_quant_mode


def _teacher():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


def _engine(losses=None):
    teacher = _teacher().requires_grad_(False)
    student = (
        quantize_(_teacher(), QuantConfig(w_bits=4, a_bits=4), torch.zeros(2, 1, 8, 8))
        .requires_grad_(True)
        .eval()
    )
    gen = ConditionalGenerator(num_classes=3, image_size=8, channels=1, latent_dim=4, width=8)
    if losses is None:
        losses = [SoftTargetCE(), BNStatsLoss(weight=0.1), KDLoss(), SoftTargetCE(side="student")]
    engine = Engine(
        accelerator=Accelerator(cpu=True),
        teacher=teacher,
        student=student,
        generator=gen,
        mixer=NoMixer(),
        losses=losses,
        generator_optimizer=torch.optim.Adam(gen.parameters(), lr=1e-2),
        student_optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
        batch_size=6,
    )
    return engine, teacher, student, gen


def _params(m):
    return [p.detach().clone() for p in m.parameters()]


def test_warmup_trains_only_the_generator_and_observers_update():
    engine, teacher, student, gen = _engine()
    set_quant_mode(student, "observe")
    s0, g0 = _params(student), _params(gen)
    engine.iteration(Phase(generator=True, observe=True, student=False), epoch=0)
    assert all(torch.equal(a, b) for a, b in zip(s0, _params(student), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(g0, _params(gen), strict=True))
    assert all(int(q.num_updates) == 1 for q in act_quantizers(student))
    assert all(p.grad is None for p in teacher.parameters())  # no teacher weight gradients


def test_student_step_uses_the_generator_batch_and_frozen_ranges_stay():
    engine, teacher, student, gen = _engine()
    set_quant_mode(student, "observe")
    engine.iteration(Phase(generator=True, observe=True, student=False), epoch=0)
    set_quant_mode(student, "frozen")
    ranges = [(q.lo.clone(), q.hi.clone()) for q in act_quantizers(student)]
    seen = []
    student.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    s0 = _params(student)
    engine.iteration(Phase(generator=True, observe=False, student=True), epoch=1)
    assert torch.equal(seen[0], engine.last_batch.images)  # the same (detached) batch
    assert not seen[0].requires_grad
    assert any(not torch.equal(a, b) for a, b in zip(s0, _params(student), strict=True))
    for (lo, hi), q in zip(ranges, act_quantizers(student), strict=True):
        assert torch.equal(lo, q.lo) and torch.equal(hi, q.hi)
    assert all(p.grad is None for p in teacher.parameters())
    means = engine.pop_loss_means(1)
    assert set(means) == {
        "loss/gen/SoftTargetCE",
        "loss/gen/BNStatsLoss",
        "loss/student/KDLoss",
        "loss/student/SoftTargetCE",
    }
    assert engine.pop_loss_means(1) == {}


def test_loss_means_average_over_iterations():
    engine, *_ = _engine()
    engine._accumulate("loss/x", torch.tensor(1.0))
    engine._accumulate("loss/x", torch.tensor(3.0))
    assert engine.pop_loss_means(2) == {"loss/x": 2.0}


def test_a_loss_reading_the_student_in_the_generator_step():
    from dfqkit.losses import AdaptiveMarginLoss, DifferenceEntropyLoss

    engine, teacher, student, gen = _engine([AdaptiveMarginLoss(), DifferenceEntropyLoss()])
    assert engine.student_in_gen_step
    set_quant_mode(student, "observe")
    s0, g0 = _params(student), _params(gen)
    engine.iteration(Phase(generator=True, observe=True, student=False), epoch=0)
    # the generator trained through the student's logits; the student's weights did not move,
    # got no gradient, and its observers saw the batch once (not again in an observe forward)
    assert any(not torch.equal(a, b) for a, b in zip(g0, _params(gen), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(s0, _params(student), strict=True))
    assert all(p.grad is None for p in student.parameters())
    assert all(p.requires_grad for p in student.parameters())
    assert all(int(q.num_updates) == 1 for q in act_quantizers(student))
    set_quant_mode(student, "frozen")
    engine.iteration(Phase(generator=True, observe=False, student=True), epoch=1)
    assert any(not torch.equal(a, b) for a, b in zip(s0, _params(student), strict=True))
