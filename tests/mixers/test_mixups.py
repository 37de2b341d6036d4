import pytest
import torch
import torch.nn.functional as F

from dfqkit.generators import ConditionalGenerator
from dfqkit.losses import SoftTargetCE
from dfqkit.mixers import EmbeddingMixup, ImageOnlyMixup, Mixup
from dfqkit.step import Step, SynthBatch


def _batch(b=6, k=4):
    torch.manual_seed(0)
    labels = torch.arange(b) % k
    return SynthBatch(
        labels=labels,
        targets=F.one_hot(labels, k).float(),
        images=torch.randn(b, 1, 3, 3, requires_grad=True),
    )


def test_mixup_blends_images_and_labels_with_the_same_weights():
    batch = _batch()
    out = Mixup(alpha=0.7)(batch, None)
    perm, lam = out.mix["perm"], out.mix["lam"]
    for i in range(6):  # sample by sample, independently
        want = lam[i] * batch.images[i] + (1 - lam[i]) * batch.images[perm[i]]
        torch.testing.assert_close(out.images[i], want)
        t = lam[i] * batch.targets[i] + (1 - lam[i]) * batch.targets[perm[i]]
        torch.testing.assert_close(out.targets[i], t)
        assert out.labels[i] == (batch.labels[i] if lam[i] >= 0.5 else batch.labels[perm[i]])
    out.images.sum().backward()
    assert batch.images.grad is not None


def test_mixup_prob_zero_is_the_identity():
    batch = _batch()
    out = Mixup(prob=0.0)(batch, None)
    torch.testing.assert_close(out.images, batch.images)
    torch.testing.assert_close(out.targets, batch.targets)


def test_image_only_mixup_targets_the_teachers_prediction():
    batch = ImageOnlyMixup()(_batch(), None)
    assert batch.targets is None
    logits = torch.randn(6, 4)
    want = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(SoftTargetCE()(Step(batch, logits)), want)


def test_embedding_mixup_per_sample_superposes_the_generators_embeddings():
    torch.manual_seed(0)
    gen = ConditionalGenerator(num_classes=10, image_size=8, channels=1, latent_dim=5)
    mixer = EmbeddingMixup(num_classes=10, classes_per_sample=3, prob=1.0, granularity="sample")
    sample = gen.sample(4, torch.device("cpu"))
    torch.manual_seed(1)
    out = mixer(sample, gen)
    classes, lam = out.mix["classes"], out.mix["lam"]
    assert (classes[:, 0] == sample.labels).all() and (lam > 0).all()
    torch.testing.assert_close(out.targets.sum(-1), torch.ones(4))
    torch.testing.assert_close(out.targets.gather(1, classes), lam)
    # the first component uses the sample's own latent
    torch.manual_seed(1)
    torch.rand(4, 10), torch.rand(4, 1), torch.randn(4, 3)  # the mixer's draws, in order
    extra = torch.randn(4, 2, 5)
    for i in range(4):
        zs = [sample.z[i], extra[i, 0], extra[i, 1]]
        want = sum(lam[i, k] * gen.embed(classes[i, k : k + 1], zs[k][None])[0] for k in range(3))
        torch.testing.assert_close(out.cond[i], want)


def test_embedding_mixup_unmixed_is_the_plain_conditioning():
    torch.manual_seed(0)
    gen = ConditionalGenerator(num_classes=10, image_size=8, channels=1, latent_dim=5)
    sample = gen.sample(4, torch.device("cpu"))
    for granularity in ("batch", "sample"):
        mixer = EmbeddingMixup(num_classes=10, classes_per_sample=3, prob=0.0,
                               granularity=granularity)  # fmt: skip
        out = mixer(sample, gen)
        torch.testing.assert_close(out.cond, gen.embed(sample.labels, sample.z))
        torch.testing.assert_close(out.targets, F.one_hot(sample.labels, 10).float())
        assert not out.mix["mixed"].any()


def test_embedding_mixup_unmixed_form_even_when_it_always_mixes():
    """``unmixed`` (what ``train.calibration = 'generator_unmixed'`` observes) is the plain
    conditioning whatever ``prob`` is; ``synthesize(mix=False)`` uses it."""
    from dfqkit.generators import synthesize

    gen = ConditionalGenerator(num_classes=10, image_size=8, channels=1, latent_dim=5)
    mixer = EmbeddingMixup(num_classes=10, classes_per_sample=3, prob=1.0)
    torch.manual_seed(0)
    sample = gen.sample(4, torch.device("cpu"))
    out = mixer.unmixed(sample, gen)
    torch.testing.assert_close(out.cond, gen.embed(sample.labels, sample.z))
    assert not out.mix["mixed"].any()
    torch.manual_seed(1)
    batch = synthesize(gen, mixer, 4, torch.device("cpu"), mix=False)
    torch.testing.assert_close(batch.targets, F.one_hot(batch.labels, 10).float())
    assert not batch.mix["mixed"].any()


def test_image_mixer_is_skipped_when_unmixed():
    from dfqkit.generators import synthesize

    gen = ConditionalGenerator(num_classes=10, image_size=8, channels=1, latent_dim=5)
    torch.manual_seed(0)
    mixed = synthesize(gen, Mixup(prob=1.0), 4, torch.device("cpu"))
    torch.manual_seed(0)
    plain = synthesize(gen, Mixup(prob=1.0), 4, torch.device("cpu"), mix=False)
    torch.manual_seed(0)
    sample = gen.sample(4, torch.device("cpu"))
    images = gen(sample.replace(cond=gen.embed(sample.labels, sample.z)))
    torch.testing.assert_close(plain.images, images)
    assert plain.mix == {} and not torch.allclose(mixed.images, images)


def test_embedding_mixup_official_mixes_the_whole_batch_with_classes_drawn_with_replacement():
    """Qimera's released trainer: one CPU draw decides whether the batch is a superposition;
    its K classes are uniform with replacement (a repeated class adds up in the target)."""
    gen = ConditionalGenerator(num_classes=3, image_size=8, channels=1, latent_dim=5)
    mixer = EmbeddingMixup(num_classes=3, classes_per_sample=4, prob=0.5)
    decisions, repeated = [], False
    torch.manual_seed(0)
    for _ in range(40):
        sample = gen.sample(6, torch.device("cpu"))
        out = mixer(sample, gen)
        mixed = out.mix["mixed"]
        assert mixed.all() or not mixed.any()  # the whole batch, or none of it
        decisions.append(bool(mixed[0]))
        if mixed.any():
            classes, lam = out.mix["classes"], out.mix["lam"]
            want = torch.zeros(6, 3).index_put_((torch.arange(6)[:, None].expand(6, 4), classes),
                                                lam, accumulate=True)  # fmt: skip
            torch.testing.assert_close(out.targets, want)
            repeated |= bool((classes[:, :, None] == classes[:, None, :]).sum((1, 2)).gt(4).any())
    assert 10 <= sum(decisions) <= 30 and repeated  # about half the batches; classes repeat
    with pytest.raises(ValueError, match="granularity must be one of"):
        EmbeddingMixup(granularity="pixel")
