import math

import pytest
import torch
import torch.nn.functional as F
from _mixer_parts import mixer_parts

from dfqkit.generators import synthesize
from dfqkit.mixers import MultiLayerAttentionMixer
from dfqkit.step import Step
from dfqkit.taps import Taps

CPU = torch.device("cpu")


_parts = mixer_parts


def test_shapes_targets_and_level_embeddings(teacher):
    torch.manual_seed(0)
    gen, mixer = _parts(teacher, levels=3, classes_per_sample=4, mix_prob=1.0)
    assert mixer.embeddings.table().shape == (3, 10, 16)  # J × K × D
    assert mixer.embeddings.cut_points == [
        "features.stage1.unit1",
        "features.stage2.unit1",
        "features.stage3.unit1",
    ]
    batch = synthesize(gen, mixer, 8, CPU)
    assert batch.images.shape == (8, 1, 28, 28) and batch.cond.shape == (8, 16)
    torch.testing.assert_close(batch.targets.sum(-1), torch.ones(8))
    assert ((batch.targets > 0).sum(-1) == 4).all()  # c = 4 classes per mixed sample
    classes, sigma = batch.mix["classes"], batch.mix["sigma"]
    torch.testing.assert_close(batch.targets.gather(1, classes), sigma)


def test_unmixed_samples_get_their_own_one_hot_label(teacher):
    torch.manual_seed(0)
    gen, mixer = _parts(teacher, mix_prob=0.0)
    sample = gen.sample(6, CPU)
    batch = mixer(sample, gen)
    torch.testing.assert_close(batch.targets, F.one_hot(sample.labels, 10).float())
    assert torch.equal(batch.labels, sample.labels)


def test_unmixed_form_mixes_no_sample_and_keeps_mix_prob(teacher):
    torch.manual_seed(0)
    gen, mixer = _parts(teacher, mix_prob=1.0, classes_per_sample=4)
    sample = gen.sample(6, CPU)
    batch = mixer.unmixed(sample, gen)
    torch.testing.assert_close(batch.targets, F.one_hot(sample.labels, 10).float())
    assert not batch.mix["mixed"].any() and mixer.mix_prob == 1.0
    assert mixer(sample, gen).mix["mixed"].all()  # the training path still mixes
    torch.manual_seed(1)
    assert not synthesize(gen, mixer, 6, CPU, mix=False).mix["mixed"].any()


def test_sigma_and_o0_receive_the_generator_loss_gradient(teacher):
    torch.manual_seed(0)
    gen, mixer = _parts(teacher, mix_prob=1.0, classes_per_sample=3)
    batch = synthesize(gen, mixer, 8, CPU)
    batch.targets.retain_grad()
    logits = teacher(batch.images)
    loss = -(batch.targets * logits.log_softmax(-1)).sum(-1).mean()
    loss.backward()
    assert batch.targets.grad.abs().sum() > 0
    assert mixer.o0.grad is not None and mixer.o0.grad.abs().sum() > 0
    assert mixer.wq.grad.abs().sum() > 0  # σ's attention weights train too


def test_sigma_equals_a_direct_attention_computation(teacher):
    torch.manual_seed(0)
    gen, mixer = _parts(teacher, levels=2, classes_per_sample=3, mix_prob=1.0)
    sample = gen.sample(2, CPU)
    torch.manual_seed(5)
    batch = mixer(sample, gen)
    classes = batch.mix["classes"]
    table = mixer._table().detach()  # (J, K, D)
    h, d = mixer.heads, mixer.dim
    dh = d // h
    for i in range(2):
        per_level = []
        for j in range(2):
            q = (mixer.o0 @ mixer.wq[j]).view(h, dh)
            k = (table[j, classes[i]] @ mixer.wk[j]).view(3, h, dh)
            scores = torch.stack([(q[hh] * k[:, hh]).sum(-1) / math.sqrt(dh) for hh in range(h)])
            per_level.append(scores.softmax(-1).mean(0))
        torch.testing.assert_close(batch.mix["sigma"][i], torch.stack(per_level).mean(0))


def test_level_classifiers_train_only_during_embed_epochs(teacher):
    torch.manual_seed(0)
    gen, mixer = _parts(teacher, levels=3, embed_epochs=2)
    assert mixer.needs == {"stages"} and mixer.stage_parts == 3
    taps = Taps(teacher, mixer.needs, stage_parts=[3], example=torch.randn(2, 1, 28, 28))
    batch = synthesize(gen, mixer, 8, CPU)
    with taps:
        logits = teacher(batch.images)
    collected = taps.collect()
    assert [f.shape for f in collected["stages"][3]] == [(8, 16), (8, 32), (8, 64)]
    aux = mixer.aux_loss(Step(batch, logits, teacher_taps=collected, epoch=1))
    aux.backward()
    head_grads = [p.grad for p in mixer.embeddings.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in head_grads)
    assert all(p.grad is None for p in gen.parameters())  # features are detached
    assert mixer.aux_loss(Step(batch, logits, teacher_taps=collected, epoch=2)) is None


@pytest.mark.parametrize(
    ("knob", "gone"),
    [
        ("levels", "embeddings"),
        ("heads", "o0"),
        ("flow_steps", "flow"),
        ("blocks", "transformer"),
    ],
)
def test_zero_removes_the_part(teacher, knob, gone):
    torch.manual_seed(0)
    gen, full = _parts(teacher)
    _, off = _parts(teacher, **{knob: 0})
    assert getattr(full, gone, None) is not None
    assert getattr(off, gone, None) is None
    n_full = sum(p.numel() for p in full.parameters())
    n_off = sum(p.numel() for p in off.parameters())
    assert n_off < n_full or knob == "levels"
    if knob == "levels":
        assert off.needs == frozenset() and off.table.shape == (1, 10, 16)
    batch = synthesize(gen, off, 4, CPU)
    torch.testing.assert_close(batch.targets.sum(-1), torch.ones(4))


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="levels must be an integer >= 0"):
        MultiLayerAttentionMixer(num_classes=10, levels=-1)
    with pytest.raises(ValueError, match="dim=10 must be divisible by heads=4"):
        MultiLayerAttentionMixer(num_classes=10, dim=10, heads=4)
    with pytest.raises(ValueError, match=r"mix_prob must be in \[0, 1\]"):
        MultiLayerAttentionMixer(num_classes=10, mix_prob=1.5)
