"""Registered means tested: every component of every kind honours its kind's contract.

A new registration without an entry in the example tables below fails here on purpose.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfqkit.generators import Generator, synthesize
from dfqkit.losses.base import SIDES, Loss
from dfqkit.mixers import STAGES, Mixer, NoMixer
from dfqkit.quant import ActQuantizer
from dfqkit.registry import list_components
from dfqkit.step import Step, SynthBatch


def _names(kind):
    return [e.name for e in list_components(kind)]


MODEL_EXAMPLES = {  # name -> (kwargs, input shape, classes)
    "mnist_resnet": ({"weights": None}, (2, 1, 28, 28), 10),
    "mnist_vit": ({"weights": None}, (2, 1, 28, 28), 10),
    "cifar_resnet20": ({"num_classes": 100, "weights": None}, (2, 3, 32, 32), 100),
    "torchvision_model": ({"name": "resnet18", "num_classes": 7}, (1, 3, 32, 32), 7),
    "timm_model": ({"name": "resnet10t", "num_classes": 5}, (1, 3, 32, 32), 5),
    "mobilenet_w1": ({"num_classes": 3, "weights": None}, (1, 3, 224, 224), 3),
    "shufflenet_g1_w1": ({"num_classes": 3, "weights": None}, (1, 3, 224, 224), 3),
    "sqnxt23_w2": ({"num_classes": 3, "weights": None}, (1, 3, 224, 224), 3),
    "callable_model": ({"target": "torchvision.models:resnet18"}, (1, 3, 32, 32), 1000),
}


@pytest.mark.parametrize("name", _names("models"))
def test_model_factories_build_classifiers(name):
    from dfqkit.registry import get

    assert name in MODEL_EXAMPLES, f"add an example for the new model {name!r}"
    kwargs, shape, classes = MODEL_EXAMPLES[name]
    model = get("models", name)(**kwargs)
    with torch.no_grad():
        assert model.eval()(torch.randn(shape)).shape == (shape[0], classes)


def _generator(name):
    from dfqkit.data import digits
    from dfqkit.registry import get

    if name == "RealDataReference":
        return get("generators", name)(data=digits())
    if name == "PixelBank":
        return get("generators", name)(data=digits(), num_images=5, jitter=1)
    if name == "SyntheticSet":
        import tempfile

        from dfqkit.losses import ZeroQBNSLoss

        teacher = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10),
        ).eval()  # fmt: skip
        gen = get("generators", name)(
            data=digits(), losses=[ZeroQBNSLoss()], num_images=6, synth_batch_size=3,
            iterations=2, cache_dir=tempfile.mkdtemp(), crop_scale=(0.5, 1.0),
        )  # fmt: skip
        gen.bind(teacher=teacher, generator=gen, example=torch.zeros(2, 1, 8, 8))
        return gen
    return get("generators", name)(num_classes=10, image_size=8, channels=1)


@pytest.mark.parametrize("name", _names("generators"))
def test_generators_produce_normalized_batches_with_valid_targets(name):
    gen = _generator(name)
    assert isinstance(gen, Generator) and gen.num_classes == 10
    batch = synthesize(gen, NoMixer(), 5, torch.device("cpu"))
    assert batch.images.shape == (5, 1, 8, 8) and batch.labels.shape == (5,)
    torch.testing.assert_close(batch.targets.sum(-1), torch.ones(5))
    torch.testing.assert_close(batch.targets, F.one_hot(batch.labels, 10).float())
    if gen.trainable:
        batch.images.sum().backward()
        assert any(p.grad is not None for p in gen.parameters())


MIXER_EXAMPLES = {  # name -> kwargs (teacher-free settings; bound mixers have own tests)
    "NoMixer": {},
    "Mixup": {"alpha": 0.5},
    "ImageOnlyMixup": {"alpha": 0.5},
    "EmbeddingMixup": {"num_classes": 10, "classes_per_sample": 3, "prob": 0.5},
    "MultiLayerAttentionMixer": {
        "num_classes": 10,
        "levels": 0,
        "dim": 8,
        "heads": 2,
        "flow_heads": 2,
        "mix_prob": 1.0,
    },
}


@pytest.mark.parametrize("name", _names("mixers"))
def test_mixers_declare_a_stage_and_keep_targets_normalized(name):
    from dfqkit.registry import get

    assert name in MIXER_EXAMPLES, f"add an example for the new mixer {name!r}"
    mixer = get("mixers", name)(**MIXER_EXAMPLES[name])
    assert isinstance(mixer, Mixer) and mixer.stage in STAGES
    gen = _generator("ConditionalGenerator")
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    mixer.bind(teacher=teacher, generator=gen, example=torch.randn(2, 1, 8, 8))
    batch = synthesize(gen, mixer, 6, torch.device("cpu"))
    assert batch.images.shape == (6, 1, 8, 8)
    if batch.targets is not None:
        torch.testing.assert_close(batch.targets.sum(-1), torch.ones(6))


def _step():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3).eval()
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 1])
    # an attention mixer's record: peaked mixing coefficients that depend on the images
    mix = {"sigma": (x.mean((2, 3)) * 10).softmax(-1), "mixed": torch.ones(4, dtype=torch.bool)}
    batch = SynthBatch(labels=labels, targets=F.one_hot(labels, 3).float(), images=x, mix=mix)
    teacher = torch.randn(4, 3, requires_grad=True)
    student = torch.randn(4, 3, requires_grad=True)
    taps = {
        "bn_inputs": [(x * 2, bn)],
        "activations": [x.relu()],
        "stages": {1: [x.mean((2, 3))]},
        "attention": [x * 1.5],  # (b, heads, tokens, head_dim)
        "block_attention": [F.normalize(x.pow(2).mean((2, 3)), dim=1)],
    }
    student_taps = {"activations": [x * x], "block_attention": [F.normalize(x.mean((2, 3)), dim=1)]}
    return Step(batch, teacher, student, teacher_taps=taps, student_taps=student_taps)


@pytest.mark.parametrize("name", _names("losses"))
def test_losses_are_weighted_differentiable_scalars_on_their_side(name):
    from dfqkit.registry import get

    cls = get("losses", name)

    def build(**kw):
        loss = cls(**kw)
        if hasattr(loss, "observe"):  # a loss that looks back at earlier images: give it some
            feats = _step().teacher_taps["stages"][1][0].detach()
            loss.observe(-feats, _step().batch.labels, num_classes=3)
        return loss

    loss = build()
    assert isinstance(loss, Loss) and loss.side in SIDES
    step = _step()
    value = loss(step)
    assert value.shape == () and torch.isfinite(value)
    trained = step.teacher_logits if loss.side == "generator" else step.student_logits
    inputs = [trained, step.batch.images]
    grads = torch.autograd.grad(value, inputs, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reaches the side"
    torch.testing.assert_close(build(weight=3.0)(_step()), 3 * value.detach())


@pytest.mark.parametrize("name", _names("quantizers"))
def test_quantizers_at_16_bits_are_near_identity_and_hold_state_in_buffers(name):
    from dfqkit.registry import get

    q = get("quantizers", name)(bits=16)
    x = torch.randn(4, 3, 5, 5)
    if hasattr(q, "bind_weight"):  # fitted to its weight (AdaRound): quantize_ binds it
        q.bind_weight(x)
    y = q(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert (y - x).abs().max() < (x.max() - x.min()) / 2**15
    if isinstance(q, ActQuantizer):
        assert {"lo", "hi", "num_updates"} <= set(q.state_dict())
