"""MobileNet v1 in pytorchcv's layout (the factory ``mobilenet_w1`` is in ``pytorchcv_imagenet``).

IntraQ and HAST report pytorchcv's ``mobilenet_w1``; torchvision has no MobileNet v1 and timm's
has another layout. State-dict keys, as in pytorchcv::

    features.init_block.{conv.weight, bn.*}                      # 3×3/2, 3 → 32
    features.stage{s}.unit{u}.dw_conv.{conv.weight, bn.*}        # 3×3 depthwise
    features.stage{s}.unit{u}.pw_conv.{conv.weight, bn.*}        # 1×1 pointwise
    output.{weight, bias}

Every conv block is conv (no bias) → BN → its own ReLU module, called once.
"""

from __future__ import annotations

import torch
from torch import nn

from dfqkit.models.cifar_resnet import ConvBlock

# Output channels of each depthwise-separable unit, by stage; the first unit of every stage but
# the first has stride 2 (224 → 112 stem → 112, 56, 28, 14, 7).
STAGES: tuple[tuple[int, ...], ...] = ((64,), (128, 128), (256, 256), (512,) * 6, (1024, 1024))

# By hand (conv: c_in/groups*c_out*k*k, no bias; BN: 2*c):
#   init_block               3*32*9 + 64                                          =       928
#   unit c_in → c_out        dw: c_in*9 + 2*c_in;  pw: c_in*c_out + 2*c_out
#     32→64  : 352 + 2,176 = 2,528        64→128  : 704 + 8,448 = 9,152
#     128→128: 1,408 + 16,640 = 18,048    128→256 : 1,408 + 33,280 = 34,688
#     256→256: 2,816 + 66,048 = 68,864    256→512 : 2,816 + 132,096 = 134,912
#     512→512: 5,632 + 263,168 = 268,800 (×5)      512→1024: 5,632 + 526,336 = 531,968
#     1024→1024: 11,264 + 1,050,624 = 1,061,888
#   features total           3,206,976
#   output                   1024*k + k                                  k=1000 → 1,025,000
#   total                                                                k=1000 → 4,231,976
MOBILENET_W1_PARAMS = 4_231_976  # pytorchcv's mobilenet._test asserts the same


class DwsConvBlock(nn.Module):
    """Depthwise 3×3 conv block (stride) → pointwise 1×1 conv block (pytorchcv ``DwsConvBlock``)."""

    def __init__(self, *, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.dw_conv = ConvBlock(
            in_channels=in_channels,
            out_channels=in_channels,
            kernel_size=3,
            stride=stride,
            groups=in_channels,
        )
        self.pw_conv = ConvBlock(in_channels=in_channels, out_channels=out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw_conv(self.dw_conv(x))


class MobileNetV1(nn.Module):
    """MobileNet v1: 3×3/2 stem, 13 depthwise-separable units, global average pool, linear.

    Args:
        width_scale: channel multiplier (pytorchcv's ``int(c * width_scale)``).
        in_size: image height = width; the final pool averages the ``in_size / 32`` map
            (pytorchcv: a fixed 7×7 pool, the same at 224).
        num_classes: outputs of the linear classifier.

    Shapes: ``(b, 3, in_size, in_size)`` → ``(b, num_classes)``.
    """

    def __init__(self, *, width_scale: float = 1.0, in_size: int = 224, num_classes: int = 1000):
        super().__init__()
        self.in_size, self.num_classes = in_size, num_classes
        scale = (lambda c: int(c * width_scale)) if width_scale != 1.0 else (lambda c: c)
        self.features = nn.Sequential()
        channels = scale(32)
        self.features.add_module(
            "init_block", ConvBlock(in_channels=3, out_channels=channels, kernel_size=3, stride=2)
        )
        for i, widths in enumerate(STAGES):
            stage = nn.Sequential()
            for j, width in enumerate(widths):
                stride = 2 if j == 0 and i != 0 else 1
                stage.add_module(
                    f"unit{j + 1}",
                    DwsConvBlock(in_channels=channels, out_channels=scale(width), stride=stride),
                )
                channels = scale(width)
            self.features.add_module(f"stage{i + 1}", stage)
        final_size = -(-in_size // 32)  # five stride-2 steps, each rounding up
        self.features.add_module("final_pool", nn.AvgPool2d(kernel_size=final_size, stride=1))
        self.output = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.features(x).flatten(1))  # (b, c, 1, 1) → (b, k)
