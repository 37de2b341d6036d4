"""One iteration of the loop on tiny models: phases, reuse of the batch, no teacher gradients."""

import pytest
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


def _engine(losses=None, mixer=None, **kwargs):
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
        mixer=NoMixer() if mixer is None else mixer,
        losses=losses,
        generator_optimizer=torch.optim.Adam(gen.parameters(), lr=1e-2),
        student_optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
        batch_size=6,
        **kwargs,
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
    means = engine.pop_loss_means()
    assert set(means) == {
        "gen/SoftTargetCE",
        "gen/BNStatsLoss",
        "student/KDLoss",
        "student/SoftTargetCE",
    }
    assert engine.pop_loss_means() == {}


def test_loss_means_average_over_iterations():
    engine, *_ = _engine()
    engine._accumulate("loss/x", torch.tensor(1.0))
    engine._accumulate("loss/x", torch.tensor(3.0))
    assert engine.pop_loss_means() == {"loss/x": 2.0}


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


def test_perturbed_sample_doubles_the_batch_with_the_sign_gradient_step():
    """HAST: x' = x + eps·sign(∇x L(x)) from an independent computation of L; the student then
    sees [x; x'] with the teacher's logits on both, and the loss is L(x) + L(x')."""
    from dfqkit.phases import OneStepPerturbation
    from dfqkit.step import Step, SynthBatch

    engine, teacher, student, _ = _engine([SoftTargetCE(), KDLoss()])
    perturb = OneStepPerturbation(0.05)
    torch.manual_seed(1)
    x = torch.randn(6, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    batch = SynthBatch(labels=labels, targets=torch.nn.functional.one_hot(labels, 3).float(),
                       images=x)  # fmt: skip
    t_logits = teacher(x)
    set_quant_mode(student, "observe")
    with torch.no_grad():
        student(x)
    set_quant_mode(student, "frozen")
    doubled, both_logits, _ = perturb(engine, batch, t_logits, {}, epoch=0)
    xr = x.clone().requires_grad_(True)
    loss = KDLoss()(Step(batch.replace(images=xr), t_logits, student(xr)))
    (g,) = torch.autograd.grad(loss, xr)
    adv = x + 0.05 * g.sign()
    torch.testing.assert_close(doubled.images, torch.cat([x, adv]))
    torch.testing.assert_close(both_logits, torch.cat([t_logits, teacher(adv)]))
    assert doubled.labels.tolist() == labels.tolist() * 2
    assert all(p.grad is None for p in student.parameters())  # no weight gradient from the probe
    # the student step's loss is L(x) + L(x')
    s_both = student(doubled.images)
    l_both = 2 * KDLoss()(Step(doubled, both_logits, s_both))
    l_sum = KDLoss()(Step(batch, t_logits, student(x))) + KDLoss()(
        Step(batch.replace(images=adv), teacher(adv), student(adv))
    )
    torch.testing.assert_close(l_both, l_sum)


def test_constant_images_are_flat_in_the_valid_pixel_range_and_teacher_labelled():
    """train.constant_images: n = round(fraction·b) images, each one value per channel inside
    [(0 - mean)/std, (1 - mean)/std], appended with the teacher's logits and taps on them and
    its probabilities as their targets; mixing records are padded with zeros."""
    from dfqkit.phases import ConstantImages
    from dfqkit.step import SynthBatch

    engine, teacher, _, _ = _engine([SoftTargetCE(), BNStatsLoss(weight=0.1), KDLoss()])
    engine.student_reads = {"bn_inputs"}
    const = ConstantImages(0.5, mean=(0.25,), std=(0.5,))
    torch.manual_seed(3)
    x = torch.randn(6, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    targets = torch.nn.functional.one_hot(labels, 3).float()
    batch = SynthBatch(labels=labels, targets=targets, images=x,
                       mix={"mixed": torch.ones(6), "sigma": torch.rand(6, 3)})  # fmt: skip
    with engine.teacher_taps:
        t_logits = teacher(x)
    taps = engine.teacher_taps.collect()
    ext, logits, ext_taps = const(engine, batch, t_logits, taps, epoch=0)
    assert ext.images.shape == (9, 1, 8, 8)
    torch.testing.assert_close(ext.images[:6], x)
    flat = ext.images[6:]
    assert torch.equal(flat, flat[:, :, :1, :1].expand_as(flat))  # one value per image
    assert flat.min() >= -0.5 and flat.max() <= 1.5  # (0 - .25)/.5 and (1 - .25)/.5
    assert flat[:, 0, 0, 0].unique().numel() == 3
    with torch.no_grad():
        want = teacher(flat)
    torch.testing.assert_close(logits, torch.cat([t_logits, want]))
    torch.testing.assert_close(ext.targets[6:], want.softmax(-1))
    torch.testing.assert_close(ext.targets[:6], targets)
    assert ext.labels[6:].tolist() == want.argmax(-1).tolist()
    assert ext.mix["mixed"].tolist() == [1.0] * 6 + [0.0] * 3
    assert ext.mix["sigma"].shape == (9, 3) and not ext.mix["sigma"][6:].any()
    (bn_in, bn), (got, got_bn) = taps["bn_inputs"][0], ext_taps["bn_inputs"][0]
    assert got_bn is bn and got.shape[0] == 9
    torch.testing.assert_close(got[:6], bn_in)
    torch.testing.assert_close(got[6:], teacher[0](flat))
    assert ConstantImages(0.01, (0.0,), (1.0,)).count(64) == 1  # at least one image


def test_constant_images_reach_the_student_step():
    from dfqkit.phases import ConstantImages

    engine, _, student, _ = _engine(constant_images=ConstantImages(0.5, (0.5,), (0.5,)))
    set_quant_mode(student, "observe")
    engine.iteration(Phase(generator=True, observe=True, student=False), epoch=0)
    set_quant_mode(student, "frozen")
    seen = []
    student.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    engine.iteration(Phase(generator=True, observe=False, student=True), epoch=1)
    (images,) = seen
    assert images.shape[0] == 9
    torch.testing.assert_close(images[:6], engine.last_batch.images)
    assert torch.equal(images[6:], images[6:, :, :1, :1].expand_as(images[6:]))


def test_block_attention_tap_and_feature_attention_loss():
    from dfqkit.losses import FeatureAttentionLoss
    from dfqkit.models.mnist_resnet import mnist_resnet
    from dfqkit.models.split import find_blocks
    from dfqkit.step import Step, SynthBatch
    from dfqkit.taps import Taps

    torch.manual_seed(0)
    model = mnist_resnet(weights=None).eval()
    x = torch.randn(3, 1, 28, 28)
    taps = Taps(model, {"block_attention"}, example=x)
    with taps:
        model(x)
    got = taps.collect()["block_attention"]
    taps.remove()
    names = find_blocks(model, x)
    assert len(got) == len(names)
    outs = {}
    block = dict(model.named_modules())[names[-1]]
    h = block.register_forward_hook(lambda m, a, o: outs.setdefault("o", o))
    model(x)
    h.remove()
    want = torch.nn.functional.normalize(outs["o"].pow(2).mean((2, 3)), dim=1)
    torch.testing.assert_close(got[-1], want)
    assert torch.allclose(got[0].norm(dim=1), torch.ones(3))
    t = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.6, 0.8]])]
    s = [torch.tensor([[0.0, 1.0]]), torch.tensor([[0.6, 0.8]])]
    one = SynthBatch(labels=torch.zeros(1, dtype=torch.long))
    step = Step(one, None, None, teacher_taps={"block_attention": t},
                student_taps={"block_attention": s})  # fmt: skip
    assert float(FeatureAttentionLoss(weight=10.0)(step)) == pytest.approx(10 * (1 + 1) / 2)


def test_adasg_as_released_observes_each_calibration_batch_twice():
    from dfqkit.losses import AdaptiveMarginLoss, DifferenceEntropyLoss

    losses = [AdaptiveMarginLoss(), DifferenceEntropyLoss()]
    engine, _, student, _ = _engine(losses, observe_twice=True)
    set_quant_mode(student, "observe")
    engine.iteration(Phase(generator=True, observe=True, student=False), epoch=0)
    assert all(int(q.num_updates) == 2 for q in act_quantizers(student))


@pytest.mark.parametrize("student_in_gen_step", [False, True])
def test_unmixed_calibration_observes_only_a_separate_unmixed_batch(student_in_gen_step):
    """``observe_unmixed``: before the generator step the student observes a batch of the
    generator (as it was) with mixing off, and never the mixed training batch, also when a
    generator-side loss runs the student."""
    import copy

    from dfqkit.generators import synthesize
    from dfqkit.losses import AdaptiveMarginLoss, DifferenceEntropyLoss
    from dfqkit.mixers import Mixup

    losses = [AdaptiveMarginLoss(), DifferenceEntropyLoss()] if student_in_gen_step else None
    engine, _, student, gen = _engine(losses, mixer=Mixup(prob=1.0), observe_unmixed=True)
    assert engine.student_in_gen_step == student_in_gen_step
    gen0, reference = copy.deepcopy(gen), copy.deepcopy(student)
    set_quant_mode(student, "observe")
    set_quant_mode(reference, "observe")
    torch.manual_seed(3)
    engine.iteration(Phase(generator=True, observe=True, student=False), epoch=0)
    torch.manual_seed(3)
    with torch.no_grad():
        reference(synthesize(gen0, NoMixer(), 6, torch.device("cpu")).images)
    for q, r in zip(act_quantizers(student), act_quantizers(reference), strict=True):
        assert int(q.num_updates) == 1 and q.mode == "observe"
        torch.testing.assert_close((q.lo, q.hi), (r.lo, r.hi))
    # the training batch the generator stepped on was mixed, and it is not what was observed
    assert engine.last_batch.mix and "perm" in engine.last_batch.mix


def test_a_student_side_loss_may_read_the_stages_tap():
    from dfqkit.losses.base import Loss
    from dfqkit.models.mnist_resnet import mnist_resnet

    class StageMatch(Loss):
        """Student side; reads the teacher's pooled stage features."""

        default_side = "student"
        needs = frozenset({"stages"})
        stage_parts = 2

        def compute(self, step):
            feats = step.teacher_taps["stages"][2]
            return sum(f.float().mean() for f in feats) * 0 + step.logits("student").mean()

    teacher = mnist_resnet(weights=None).requires_grad_(False)
    student = quantize_(mnist_resnet(weights=None), QuantConfig(w_bits=4, a_bits=4),
                        torch.zeros(2, 1, 28, 28)).eval()  # fmt: skip
    gen = ConditionalGenerator(num_classes=10, image_size=28, channels=1, latent_dim=4, width=8)
    engine = Engine(accelerator=Accelerator(cpu=True), teacher=teacher, student=student,
                    generator=gen, mixer=NoMixer(), losses=[SoftTargetCE(), StageMatch()],
                    generator_optimizer=torch.optim.Adam(gen.parameters(), lr=1e-3),
                    student_optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
                    batch_size=4, example=torch.zeros(2, 1, 28, 28))  # fmt: skip
    set_quant_mode(student, "observe")
    engine.iteration(Phase(generator=True, observe=True, student=False), epoch=0)
    set_quant_mode(student, "frozen")
    engine.iteration(Phase(generator=True, observe=False, student=True), epoch=1)
    assert "student/StageMatch" in engine.pop_loss_means()
