import pytest
import torch

from dfqkit.generators import QimeraGenerator, synthesize
from dfqkit.mixers import EmbeddingMixup, NoMixer
from dfqkit.models.mnist_resnet import mnist_resnet


def test_embeddings_start_from_the_teachers_classifier_rows():
    teacher = mnist_resnet(weights=None)
    gen = QimeraGenerator(num_classes=10, image_size=28, channels=1, latent_dim=64)
    gen.bind(teacher=teacher, generator=gen, example=torch.zeros(2, 1, 28, 28))
    torch.testing.assert_close(gen.label_emb.weight, teacher.output.weight)
    wrong = QimeraGenerator(num_classes=10, image_size=28, channels=1, latent_dim=32)
    with pytest.raises(ValueError, match="latent_dim=32 must equal the teacher classifier's"):
        wrong.bind(teacher=teacher, generator=wrong, example=torch.zeros(2, 1, 28, 28))


def _qimera(**kw):
    return QimeraGenerator(num_classes=10, image_size=8, channels=1, latent_dim=6,
                           embedding_init="random", noise_scale=0.5, **kw)  # fmt: skip


def test_input_is_normalised_as_the_official_batchnorm_of_the_transpose():
    """Official: ``BatchNorm1d(affine=False, no running stats)`` applied to ``(emb + z).T``:
    each sample standardised over its features; a superposition's ``(b, K, d)`` transposed to
    ``(d, K, b)``: each slot standardised over samples and features."""
    torch.manual_seed(0)
    gen = _qimera()
    labels, z = torch.randint(0, 10, (16,)), torch.randn(16, 6)
    x = gen.label_emb(labels) + 0.5 * z
    want = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(gen.embed(labels, z), want, rtol=1e-4, atol=1e-4)
    bn = torch.nn.BatchNorm1d(6, affine=False, track_running_stats=False)  # independent
    slots, zs = torch.randint(0, 10, (16, 3)), torch.randn(16, 3, 6)
    x = gen.label_emb(slots) + 0.5 * zs
    want = bn(x.permute(2, 1, 0)).permute(2, 1, 0)
    torch.testing.assert_close(gen.embed_slots(slots, zs), want, rtol=1e-5, atol=1e-5)
    per_slot = gen.embed_slots(slots, zs)
    assert per_slot[:, 1].mean().abs() < 1e-5 and abs(per_slot[:, 1].var(unbiased=False) - 1) < 1e-3


def test_input_norm_feature_is_the_batch_normalised_sum_of_embedding_and_noise():
    torch.manual_seed(0)
    gen = _qimera(input_norm="feature")
    labels, z = torch.randint(0, 10, (16,)), torch.randn(16, 6)
    x = gen.label_emb(labels) + 0.5 * z
    want = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(gen.embed(labels, z), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="input_norm must be one of"):
        _qimera(input_norm="layer")


def test_mapping_cbn_and_embedding_mixup_run():
    torch.manual_seed(0)
    gen = QimeraGenerator(
        num_classes=10,
        image_size=8,
        channels=1,
        latent_dim=6,
        embedding_init="random",
        mapping=True,
        conditioning="cbn",
        freeze_embedding=True,
    )
    assert gen.l1.in_features == 100 and not gen.label_emb.weight.requires_grad
    mixer = EmbeddingMixup(num_classes=10, classes_per_sample=3, prob=1.0)
    batch = synthesize(gen, mixer, 8, torch.device("cpu"))
    assert batch.images.shape == (8, 1, 8, 8) and batch.cond.shape == (8, 6)
    assert synthesize(gen, NoMixer(), 4, torch.device("cpu")).images.shape == (4, 1, 8, 8)


def test_cbn_mix_mean_divides_a_mixed_samples_weights_by_its_class_count():
    torch.manual_seed(0)
    kw = dict(num_classes=4, image_size=8, channels=1, latent_dim=6, embedding_init="random")
    summed = QimeraGenerator(conditioning="cbn", **kw).eval()
    mean = QimeraGenerator(conditioning="cbn", cbn_mix="mean", **kw).eval()
    mean.load_state_dict(summed.state_dict())
    with torch.no_grad():  # distinct per-class γ, β so the weighting shows
        for m in summed.modules():
            for name, p in m.named_parameters(recurse=False):
                if "emb" in name or "gamma" in name or "beta" in name:
                    p.normal_()
        mean.load_state_dict(summed.state_dict())
    from dfqkit.step import SynthBatch

    t = torch.tensor([[0.3, 0.7, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.2, 0.2, 0.2, 0.4]])
    cond = torch.randn(3, 6)
    batch = SynthBatch(labels=t.argmax(1), targets=t, cond=cond)
    by_hand = batch.replace(targets=t / torch.tensor([[2.0], [1.0], [4.0]]))
    torch.testing.assert_close(mean.decode(batch), summed.decode(by_hand))
    assert not torch.allclose(mean.decode(batch)[0], summed.decode(batch)[0])
    torch.testing.assert_close(mean.decode(batch)[1], summed.decode(batch)[1])  # unmixed: same
    with pytest.raises(ValueError, match="cbn_mix must be one of"):
        QimeraGenerator(cbn_mix="avg", **kw)
