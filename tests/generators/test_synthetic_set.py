"""SyntheticSet (stage one: pixels optimised against the teacher, cached; stage two: served), its
augmentations and the synthesis losses, against independent formulations."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfqkit.data import EvalData
from dfqkit.generators import SyntheticSet
from dfqkit.generators.augment import apply_crops, crop_boxes, random_resized_crop
from dfqkit.losses import FocalCE, TargetProbabilityLoss, ZeroQBNSLoss
from dfqkit.step import Step, SynthBatch
from dfqkit.taps import Taps


def _teacher():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    with torch.no_grad():
        net[1].running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        net[1].running_var.copy_(torch.tensor([1.5, 0.5, 2.0, 1.0]))
    return net.eval().requires_grad_(False)


def _data(size=8):
    return EvalData(
        name="toy", num_classes=3, image_size=size, channels=1, mean=(0.5,), std=(0.25,),
        train=None, val=None, test=None,
    )  # fmt: skip


def test_zeroq_loss_matches_a_loop_over_samples_and_channels():
    teacher = _teacher()
    x = torch.randn(5, 1, 6, 6)
    taps = Taps(teacher, {"bn_inputs"})
    with taps:
        logits = teacher(x)
    step = Step(SynthBatch(labels=torch.zeros(5, dtype=torch.long), images=x), logits, None,
                teacher_taps=taps.collect())  # fmt: skip
    taps.remove()
    got = ZeroQBNSLoss(eps=1e-6)(step)
    conv_out = teacher[0](x)
    bn, eps, want = teacher[1], 1e-6, 0.0
    for feats, mu, sd in (
        (conv_out, bn.running_mean, (bn.running_var + eps).sqrt()),
        (x, torch.zeros(1), torch.ones(1)),
    ):
        for i in range(feats.shape[0]):
            for c in range(feats.shape[1]):
                v = feats[i, c].flatten()
                want += (float(mu[c]) - float(v.mean())) ** 2 / feats.shape[0]
                want += (
                    float(sd[c]) - (float(v.var(unbiased=True)) + eps) ** 0.5
                ) ** 2 / feats.shape[0]
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_target_probability_and_focal_ce_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    p = logits.softmax(1)
    batch = SynthBatch(labels=labels, mix={"target_prob": torch.tensor([0.9, 1.0])})
    step = Step(batch, logits, None)
    want = ((p[0, 0] - 0.9) ** 2 + (p[1, 2] - 1.0) ** 2) / 2
    assert float(TargetProbabilityLoss()(step)) == pytest.approx(float(want))
    ce = -p[torch.arange(2), labels].log()
    focal = ((1 - p[torch.arange(2), labels]) ** 2 * ce).mean()
    assert float(FocalCE(gamma=2.0, weight=10.0)(step)) == pytest.approx(10 * float(focal))
    assert float(FocalCE(gamma=0.0)(step)) == pytest.approx(float(F.cross_entropy(logits, labels)))


def test_crops_identity_flip_and_gradient():
    x = torch.randn(4, 2, 6, 6, requires_grad=True)
    theta = crop_boxes(4, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    torch.testing.assert_close(apply_crops(x, theta), x)
    g = torch.Generator().manual_seed(3)
    theta = crop_boxes(4, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True, generator=g)
    flipped = theta[:, 0, 0] < 0
    assert 0 < int(flipped.sum()) < 4  # a per-sample draw
    out = apply_crops(x, theta)
    torch.testing.assert_close(out[flipped], x[flipped].flip(3))
    torch.testing.assert_close(out[~flipped], x[~flipped])
    random_resized_crop(x, scale=(0.3, 0.6)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _set(tmp_path, **kw):
    args = dict(
        data=_data(), losses=[ZeroQBNSLoss()], num_images=8, synth_batch_size=4, iterations=5,
        lr=0.1, cache_dir=str(tmp_path), seed=1,
    )  # fmt: skip
    args.update(kw)
    return SyntheticSet(**args)


def _bind(s, teacher):
    s.bind(teacher=teacher, generator=s, example=torch.zeros(2, 1, 8, 8))


def test_synthesis_lowers_the_loss_is_cached_and_resumes_batch_by_batch(tmp_path, monkeypatch):
    teacher = _teacher()
    s = _set(tmp_path)
    _bind(s, teacher)
    assert s.images.shape == (8, 1, 8, 8) and s.labels.shape == (8,)
    files = sorted(p.name for p in s.cache_path.iterdir())
    assert files == ["batch_0000.safetensors", "batch_0001.safetensors"]
    # more iterations lower ZeroQ's loss on the same starting noise
    longer = _set(tmp_path / "b", iterations=40)
    _bind(longer, teacher)

    def loss_of(images):
        taps = Taps(teacher, {"bn_inputs"})
        with taps:
            logits = teacher(images)
        step = Step(SynthBatch(labels=s.labels, images=images), logits, None,
                    teacher_taps=taps.collect())  # fmt: skip
        taps.remove()
        return float(ZeroQBNSLoss()(step))

    assert loss_of(longer.images) < loss_of(s.images)
    # a second run with the same teacher and settings reads the cache
    calls = []
    original = SyntheticSet._synthesize

    def spy(self, teacher, batches, *a, **k):
        calls.append(list(batches))
        return original(self, teacher, batches, *a, **k)

    monkeypatch.setattr(SyntheticSet, "_synthesize", spy)
    again = _set(tmp_path)
    _bind(again, teacher)
    assert calls == [] and torch.equal(again.images, s.images)
    # a run killed after batch 0: only batch 1 is made again, bit for bit the same
    (s.cache_path / "batch_0001.safetensors").unlink()
    third = _set(tmp_path)
    _bind(third, teacher)
    assert calls == [[1]] and torch.equal(third.images, s.images)
    # another setting or another teacher is another set
    assert _set(tmp_path, iterations=6).key(teacher) != s.key(teacher)
    other = _teacher()
    with torch.no_grad():
        other[0].weight.add_(1e-3)
    assert s.key(other) != s.key(teacher)


def test_serving_walks_a_permutation_and_resumes_its_order(tmp_path):
    s = _set(tmp_path)
    _bind(s, _teacher())
    index = {float(s.images[i].sum()): i for i in range(8)}
    seen = [
        index[float(im.sum())] for _ in range(2) for im in s.sample(4, torch.device("cpu")).images
    ]
    assert sorted(seen) == list(range(8))  # one pass = every image once
    state = s.get_extra_state()
    nxt = s.sample(3, torch.device("cpu")).images
    t = _set(tmp_path)
    _bind(t, _teacher())
    t.set_extra_state(state)
    torch.testing.assert_close(t.sample(3, torch.device("cpu")).images, nxt)


def test_target_probabilities_and_bad_settings(tmp_path):
    s = _set(tmp_path, target_prob_low=0.6, losses=[TargetProbabilityLoss()], labels="balanced")
    _, labels, mix, _ = s._initial(0, torch.device("cpu"))
    t = mix["target_prob"]
    assert labels.tolist() == [0, 1, 2, 0] and ((t >= 0.6) & (t <= 1.0)).all()
    with pytest.raises(ValueError, match="num_images=10 must be a multiple of synth_batch_size=4"):
        _set(tmp_path, num_images=10)
    with pytest.raises(ValueError, match="crop_scale must be None or"):
        _set(tmp_path, crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="init must be one of"):
        _set(tmp_path, init="zeros")


def test_intra_class_margin_by_hand():
    from dfqkit.losses import IntraClassMarginLoss

    loss = IntraClassMarginLoss(low=0.1, high=0.5)
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    step = Step(
        SynthBatch(labels=labels), torch.zeros(3, 2), None, teacher_taps={"stages": {1: [f]}}
    )
    assert float(loss(step)) == 0.0  # no centroid yet
    loss.observe(torch.tensor([[1.0, 0.0], [3.0, 0.0]]), torch.tensor([0, 0]), num_classes=3)
    # class 0 centroid (2, 0): d = 0 for sample 0 (below low: 0.1), d = 1 for sample 1 (above
    # high: 0.5); class 1 has no centroid and does not count
    assert float(loss(step)) == pytest.approx(((0.1 - 0.0) + (1.0 - 0.5)) / 2)


def test_groups_look_back_at_the_images_of_earlier_groups(tmp_path, monkeypatch):
    from dfqkit.losses import IntraClassMarginLoss
    from dfqkit.models.mnist_resnet import mnist_resnet

    torch.manual_seed(0)
    teacher = mnist_resnet(num_classes=3, weights=None).eval().requires_grad_(False)
    margin = IntraClassMarginLoss(low=0.0, high=0.5)
    seen = []
    original = IntraClassMarginLoss.observe

    def spy(self, features, labels, num_classes):
        seen.append(labels.clone())
        return original(self, features, labels, num_classes)

    monkeypatch.setattr(IntraClassMarginLoss, "observe", spy)
    s = _set(tmp_path, losses=[ZeroQBNSLoss(), margin], num_images=12, group_batches=1,
             data=_data(size=28), iterations=2)  # fmt: skip
    s.bind(teacher=teacher, generator=s, example=torch.zeros(2, 1, 28, 28))
    # before group 1 it saw batch 0; before group 2 batches 0 and 1
    assert [len(x) for x in seen] == [4, 4, 4]
    torch.testing.assert_close(torch.cat(seen[1:]), s.labels[:8])
    expected = torch.zeros(3)
    expected.index_add_(0, s.labels[:8], torch.ones(8))
    torch.testing.assert_close(margin.counts, expected)


def test_dsg_slack_and_layer_emphasis_match_a_loop():
    teacher = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(),
        nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3),
    ).eval()  # fmt: skip
    with torch.no_grad():
        for bn in (teacher[1], teacher[4]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    torch.manual_seed(2)
    x = torch.randn(3, 1, 4, 4)
    taps = Taps(teacher, {"bn_inputs"})
    with taps:
        logits = teacher(x)
    step = Step(SynthBatch(labels=torch.zeros(3, dtype=torch.long), images=x), logits, None,
                teacher_taps=taps.collect())  # fmt: skip
    taps.remove()
    got = ZeroQBNSLoss(input_prior=False, slack=1.5, layer_emphasis=2.0)(step).detach()
    with torch.no_grad():
        feats = [teacher[0](x)]
        feats.append(teacher[3](teacher[2](teacher[1](feats[0]))))
    want = 0.0
    for layer, (f, bn) in enumerate(zip(feats, (teacher[1], teacher[4]), strict=True)):
        sigma = (bn.running_var + 1e-6).sqrt()
        p = 16
        for i in range(3):
            w = 2.0 if i % 2 == layer else 1.0
            for c in range(2):
                v = f[i, c].flatten()
                dm = max(
                    abs(float(v.mean() - bn.running_mean[c])) - 1.5 * float(sigma[c]) / p**0.5, 0
                )
                sd = (float(v.var(unbiased=True)) + 1e-6) ** 0.5
                ds = max(
                    abs(sd - float(sigma[c])) - 1.5 * float(sigma[c]) / (2 * (p - 1)) ** 0.5, 0
                )
                want += w * (dm**2 + ds**2) / 3
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_image_prior_by_hand():
    from dfqkit.losses import ImagePrior

    x = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    step = Step(SynthBatch(labels=torch.zeros(1, dtype=torch.long), images=x), None, None)
    # differences: horizontal (-1, -2), vertical (-2, -3), diagonals (2 - 1 = 1), (0 - 4 = -4)
    tv = 5**0.5 + 13**0.5 + 1.0 + 4.0
    l2 = (0 + 1 + 4 + 16) ** 0.5
    assert float(ImagePrior(tv_l2=0.5, l2=0.25)(step)) == pytest.approx(0.5 * tv + 0.25 * l2)


def test_batch_statistics_form_by_hand():
    teacher = _teacher()
    x = torch.randn(5, 1, 6, 6)
    taps = Taps(teacher, {"bn_inputs"})
    with taps:
        logits = teacher(x)
    step = Step(SynthBatch(labels=torch.zeros(5, dtype=torch.long), images=x), logits, None,
                teacher_taps=taps.collect())  # fmt: skip
    taps.remove()
    got = float(ZeroQBNSLoss(statistics="batch", eps=1e-6)(step).detach())
    with torch.no_grad():
        f = teacher[0](x)
    bn = teacher[1]
    mean = f.permute(1, 0, 2, 3).reshape(4, -1).mean(1)
    std = (f.permute(1, 0, 2, 3).reshape(4, -1).var(1, unbiased=False) + 1e-6).sqrt()
    want = ((mean - bn.running_mean) ** 2).mean() + (
        (std - (bn.running_var + 1e-6).sqrt()) ** 2
    ).mean()
    xs = x.flatten()
    want += xs.mean() ** 2 + ((xs.var(unbiased=False) + 1e-6).sqrt() - 1) ** 2
    assert got == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ValueError, match="need per-sample statistics"):
        ZeroQBNSLoss(statistics="batch", slack=1.0)


def test_genie_generator_parametrization_is_deterministic_and_swing_shifts_by_one(tmp_path):
    from dfqkit.generators.synthetic_set import _Swing

    teacher = _teacher()
    kw = dict(parametrization="generator", genie_latent_dim=8, swing=True, iterations=3)
    a = _set(tmp_path / "a", **kw)
    _bind(a, teacher)
    b = _set(tmp_path / "b", **kw)
    _bind(b, teacher)
    assert a.images.shape == (8, 1, 8, 8) and torch.isfinite(a.images).all()
    assert torch.equal(a.images, b.images)  # a fresh, seeded decoder per batch
    assert a.key(teacher) != _set(tmp_path, iterations=3).key(teacher)
    conv = nn.Conv2d(1, 1, 3, stride=2, padding=1, bias=False)
    x = torch.randn(1, 1, 6, 6)
    swing = _Swing(nn.Sequential(conv), torch.Generator().manual_seed(5))
    got = conv(x)
    swing.remove()
    dy, dx = torch.randint(0, 3, (2,), generator=torch.Generator().manual_seed(5)).tolist()
    shifted = F.pad(x, (1, 1, 1, 1), mode="reflect")[..., dy : dy + 6, dx : dx + 6]
    torch.testing.assert_close(got, conv(shifted))
