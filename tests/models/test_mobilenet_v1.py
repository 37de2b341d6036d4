"""MobileNet v1 in pytorchcv's layout (``mobilenet_w1``): count, keys, forward."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dfqkit.models import mobilenet_w1
from dfqkit.models.mobilenet_v1 import MobileNetV1


def test_parameter_count_is_pytorchcv_s():
    # the weight counts pytorchcv's mobilenet._test asserts: w1 and wd2 (width 0.5)
    assert sum(p.numel() for p in mobilenet_w1().parameters()) == 4_231_976
    assert sum(p.numel() for p in MobileNetV1(width_scale=0.5).parameters()) == 1_331_592


def test_keys_and_shapes_are_pytorchcv_s():
    state = mobilenet_w1().state_dict()
    # stem conv + 5 BN entries; 13 units of 2 × (conv + 5 BN entries); linear weight and bias
    assert len(state) == 6 + 13 * 12 + 2
    expected = {
        "features.init_block.conv.weight": (32, 3, 3, 3),
        "features.stage1.unit1.dw_conv.conv.weight": (32, 1, 3, 3),  # depthwise
        "features.stage1.unit1.pw_conv.conv.weight": (64, 32, 1, 1),
        "features.stage4.unit6.pw_conv.bn.running_var": (512,),
        "features.stage5.unit2.dw_conv.conv.weight": (1024, 1, 3, 3),
        "output.weight": (1000, 1024),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected


def test_forward_is_the_depthwise_separable_stack():
    torch.manual_seed(0)
    model = MobileNetV1(width_scale=0.25, in_size=64, num_classes=5).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 64, 64)

    def block(b, x):  # conv → BN (running statistics) → ReLU, written out
        conv, bn = b.conv, b.bn
        y = torch.nn.functional.conv2d(x, conv.weight, None, conv.stride, conv.padding, 1,
                                       conv.groups)  # fmt: skip
        y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var + bn.eps)[
            :, None, None
        ]
        return torch.relu(y * bn.weight[:, None, None] + bn.bias[:, None, None])

    y = block(model.features.init_block, x)
    strides = []
    for stage in list(model.features)[1:-1]:
        for unit in stage:
            strides.append(unit.dw_conv.conv.stride[0])
            y = block(unit.pw_conv, block(unit.dw_conv, y))
    assert strides == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]  # 64 → 32 → 2 px
    expected = model.output(y.mean((2, 3)))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    assert all(
        u.dw_conv.conv.groups == u.dw_conv.conv.in_channels
        for s in list(model.features)[1:-1]
        for u in s
    )


def test_weights_round_trip_and_bad_num_classes(tmp_path):
    torch.manual_seed(0)
    model = mobilenet_w1(num_classes=4)
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    loaded = mobilenet_w1(num_classes=4, weights=str(tmp_path / "m.safetensors"))
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        mobilenet_w1(num_classes=0)
