"""ShuffleNet v1 and SqueezeNext-23 in pytorchcv's layout: counts, keys, shapes and forward."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from dfqkit.models import shufflenet_g1_w1, sqnxt23_w2
from dfqkit.models.shufflenet import ChannelShuffle, ShuffleNet, ShuffleUnit
from dfqkit.models.squeezenext import SqueezeNext
from dfqkit.registry import get


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# The weight counts pytorchcv's own _test() functions assert (shufflenet.py, squeezenext.py).
@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda: shufflenet_g1_w1(), 1_531_936),
        (lambda: ShuffleNet(groups=2), 1_733_848),
        (lambda: ShuffleNet(groups=3), 1_865_728),
        (lambda: ShuffleNet(groups=8), 2_434_768),
        (lambda: sqnxt23_w2(), 2_583_752),
        (lambda: SqueezeNext(width_scale=1.0), 724_056),
        (lambda: SqueezeNext(width_scale=1.5), 1_511_824),
        (lambda: SqueezeNext(width_scale=1.0, units=(2, 4, 14, 1)), 921_816),  # sqnxt23v5_w1
    ],
    ids=["g1_w1", "g2_w1", "g3_w1", "g8_w1", "sqnxt23_w2", "w1", "w3d2", "23v5_w1"],
)
def test_parameter_counts_are_pytorchcv_s(build, expected):
    assert _count(build()) == expected


def test_shufflenet_keys_and_shapes_are_pytorchcv_s():
    state = shufflenet_g1_w1().state_dict()
    # stem: conv + 5 BN entries; 16 units of 3 convs + 3 BNs; linear weight and bias
    assert len(state) == 6 + 16 * 18 + 2
    assert not [k for k in state if k.endswith(".bias") and "bn" not in k and k != "output.bias"]
    expected = {
        "features.init_block.conv.weight": (24, 3, 3, 3),
        "features.init_block.bn.running_var": (24,),
        "features.stage1.unit1.compress_conv1.weight": (36, 24, 1, 1),
        "features.stage1.unit1.expand_conv3.weight": (120, 36, 1, 1),  # 144 - 24: concat
        "features.stage2.unit2.dw_conv2.weight": (72, 1, 3, 3),  # depthwise
        "features.stage3.unit1.expand_conv3.weight": (288, 144, 1, 1),  # 576 - 288
        "features.stage3.unit4.expand_bn3.running_mean": (576,),
        "output.weight": (1000, 576),
        "output.bias": (1000,),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected


def test_shufflenet_g3_groups_every_1x1_conv_but_the_first():
    state = ShuffleNet(groups=3).state_dict()
    assert state["features.stage1.unit1.compress_conv1.weight"].shape == (60, 24, 1, 1)
    assert state["features.stage1.unit1.expand_conv3.weight"].shape == (216, 20, 1, 1)
    assert state["features.stage1.unit2.compress_conv1.weight"].shape == (60, 80, 1, 1)
    assert state["features.stage2.unit1.compress_conv1.weight"].shape == (120, 80, 1, 1)


def test_sqnxt_keys_and_shapes_are_pytorchcv_s():
    model = sqnxt23_w2()
    state = model.state_dict()
    # 111 conv blocks (stem, 21 units × 5, 4 identity projections, final) × (conv w, b + 5 BN)
    assert len(state) == 111 * 7 + 2
    expected = {
        "features.init_block.conv.conv.weight": (128, 3, 7, 7),
        "features.init_block.conv.conv.bias": (128,),
        "features.stage1.unit1.conv1.conv.weight": (32, 128, 1, 1),  # narrowing: r = 4
        "features.stage1.unit1.identity_conv.conv.weight": (64, 128, 1, 1),
        "features.stage1.unit2.conv3.conv.weight": (32, 16, 1, 3),
        "features.stage1.unit2.conv4.conv.weight": (32, 32, 3, 1),
        "features.stage1.unit2.conv5.bn.running_var": (64,),
        "features.stage4.unit1.conv1.conv.weight": (256, 256, 1, 1),  # downsampling: r = 1
        "features.stage4.unit1.identity_conv.conv.bias": (512,),
        "features.final_block.conv.weight": (256, 512, 1, 1),
        "output.weight": (1000, 256),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected
    with_identity = {k.split(".identity_conv")[0] for k in state if ".identity_conv." in k}
    assert with_identity == {f"features.stage{s}.unit1" for s in (1, 2, 3, 4)}


@pytest.mark.parametrize(
    "factory, sizes",
    [(shufflenet_g1_w1, [56, 28, 14, 7]), (sqnxt23_w2, [55, 55, 28, 14, 7])],
)
def test_factories_map_224_images_to_logits_through_pytorchcv_s_sizes(factory, sizes):
    model = factory(num_classes=5)
    assert get("models", factory.__name__) is factory and not model.training
    stages = [model.features.init_block] + [
        m for n, m in model.features.named_children() if n.startswith("stage")
    ]
    seen = []
    for m in stages:
        m.register_forward_hook(lambda mod, i, o: seen.append(o.shape[-1]))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 5)
    assert seen == sizes  # SqueezeNext's stem: 7×7/2 conv with padding 1, then a ceil-mode pool
    assert model.features.final_pool.kernel_size == 7


@pytest.mark.parametrize("cls", [ShuffleNet, SqueezeNext])
def test_smaller_images_pool_the_whole_last_map(cls):
    model = cls(in_size=64, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_channel_shuffle_interleaves_the_groups():
    x = torch.arange(6.0).view(1, 6, 1, 1).expand(2, 6, 2, 2)
    order = lambda y: y[0, :, 0, 0].tolist()  # noqa: E731
    assert order(ChannelShuffle(channels=6, groups=3)(x)) == [0, 2, 4, 1, 3, 5]
    assert order(ChannelShuffle(channels=6, groups=2)(x)) == [0, 3, 1, 4, 2, 5]
    assert order(ChannelShuffle(channels=6, groups=1)(x)) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="divisible"):
        ChannelShuffle(channels=6, groups=4)


def _randomize_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("downsample", [True, False])
def test_shuffle_unit_matches_a_hand_written_forward(downsample):
    torch.manual_seed(0)
    c_in = 24 if downsample else 48
    unit = ShuffleUnit(
        in_channels=c_in, out_channels=48, groups=3, downsample=downsample, ignore_group=False
    ).eval()
    _randomize_bn(unit)
    x = torch.randn(2, c_in, 9, 9)

    def bn(y, m):
        return F.batch_norm(y, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    y = F.relu(bn(F.conv2d(x, unit.compress_conv1.weight, groups=3), unit.compress_bn1))
    y = y[:, [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]]  # 12 = 3 groups of 4, interleaved
    stride = 2 if downsample else 1
    y = F.conv2d(y, unit.dw_conv2.weight, stride=stride, padding=1, groups=12)
    y = bn(F.conv2d(bn(y, unit.dw_bn2), unit.expand_conv3.weight, groups=3), unit.expand_bn3)
    if downsample:  # (2, 24, 5, 5) body ++ (2, 24, 5, 5) pooled input
        expected = F.relu(torch.cat([y, F.avg_pool2d(x, 3, stride=2, padding=1)], dim=1))
    else:
        expected = F.relu(y + x)
    with torch.no_grad():
        torch.testing.assert_close(unit(x), expected)


@pytest.mark.parametrize("factory", [shufflenet_g1_w1, sqnxt23_w2])
def test_safetensors_round_trip_through_weights(factory, tmp_path):
    torch.manual_seed(0)
    model = factory(num_classes=4)
    _randomize_bn(model)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    loaded = factory(num_classes=4, weights=str(tmp_path / "w.safetensors"))
    assert not loaded.training
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match="shape mismatches"):
        factory(num_classes=3, weights=str(tmp_path / "w.safetensors"))


@pytest.mark.parametrize("factory, relus", [(shufflenet_g1_w1, 1 + 16 * 2), (sqnxt23_w2, 132)])
def test_every_relu_is_a_module_called_exactly_once(factory, relus):
    model = factory(num_classes=2)
    modules = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(modules) == relus  # SqueezeNext: 111 conv blocks + 21 residual adds
    calls = {id(m): 0 for m in modules}
    for m in modules:
        m.register_forward_hook(lambda mod, i, o: calls.__setitem__(id(mod), calls[id(mod)] + 1))
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert set(calls.values()) == {1}


@pytest.mark.parametrize("factory", [shufflenet_g1_w1, sqnxt23_w2])
@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_num_classes_names_the_field(factory, bad):
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        factory(num_classes=bad)
