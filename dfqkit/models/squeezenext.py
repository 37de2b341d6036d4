"""SqueezeNext for ImageNet, module for module pytorchcv's ``sqnxt23_w*`` and ``sqnxt23v5_w*``.

State-dict keys, as in pytorchcv (every convolution has a bias *and* a BN after it)::

    features.init_block.conv.{conv.weight, conv.bias, bn.*}       # 7×7/2 conv, padding 1
    features.stage{s}.unit{u}.conv{1..5}.{conv.weight, conv.bias, bn.*}
    features.stage{s}.unit{u}.identity_conv.{conv.*, bn.*}        # where the shape changes
    features.final_block.{conv.*, bn.*}                           # 1×1 to the final width
    output.{weight, bias}

Every conv block ends in its own ReLU module (``activ``), the identity projection included, and
every unit has one more after the residual add; each runs exactly once per forward, so "a
quantizer after every ReLU module" applies as is. ReLUs are not in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dfqkit.models.cifar_resnet import ConvBlock


def _conv(
    *,
    kernel_size: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    **kwargs: Any,
) -> ConvBlock:
    """Convolution with bias → BatchNorm → ReLU (pytorchcv ``ConvBlock(bias=True)``), 1×1 and
    unpadded unless told."""
    return ConvBlock(kernel_size=kernel_size, padding=padding, bias=True, **kwargs)


class SqnxtUnit(nn.Module):
    """``activ(body(x) + identity(x))`` with a five-conv body, each conv block with a ReLU:

    1×1 (``c/r``, strided) → 1×1 (``c/2r``) → 1×3 (``c/r``) → 3×1 (``c/r``) → 1×1 (out).

    The reduction ``r`` and the identity follow pytorchcv: ``r = 1`` and a strided 1×1 conv
    block as identity in a downsampling unit; ``r = 4`` and a 1×1 identity where the unit
    narrows (``in_channels > out_channels``); otherwise ``r = 2`` and the input itself.
    """

    def __init__(self, *, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if stride == 2:
            reduction, self.resize_identity = 1, True
        elif in_channels > out_channels:
            reduction, self.resize_identity = 4, True
        else:
            reduction, self.resize_identity = 2, False
        mid = in_channels // reduction
        narrow = in_channels // (2 * reduction)
        self.conv1 = _conv(in_channels=in_channels, out_channels=mid, stride=stride)
        self.conv2 = _conv(in_channels=mid, out_channels=narrow)
        self.conv3 = _conv(in_channels=narrow, out_channels=mid, kernel_size=(1, 3), padding=(0, 1))
        self.conv4 = _conv(in_channels=mid, out_channels=mid, kernel_size=(3, 1), padding=(1, 0))
        self.conv5 = _conv(in_channels=mid, out_channels=out_channels)
        if self.resize_identity:
            self.identity_conv = _conv(
                in_channels=in_channels, out_channels=out_channels, stride=stride
            )
        self.activ = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, c_in, h, w) -> (b, c_out, h', w')``, ``h' = ⌈h/2⌉`` for stride 2."""
        identity = self.identity_conv(x) if self.resize_identity else x
        y = self.conv5(self.conv4(self.conv3(self.conv2(self.conv1(x)))))
        return self.activ(y + identity)


class SqnxtInitBlock(nn.Module):
    """7×7/2 conv block (padding 1, not 3) → 3×3/2 max pool with ``ceil_mode``: 224 → 110 → 55."""

    def __init__(self, *, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = _conv(
            in_channels=in_channels, out_channels=out_channels, kernel_size=7, stride=2, padding=1
        )
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(x))


class SqueezeNext(nn.Module):
    """SqueezeNext: stem, four stages of units, 1×1 conv block, average pool, linear.

    Args:
        width_scale: multiplies every width (stem 64, stages 32/64/128/256, final block 128),
            rounded down as pytorchcv does (``int(c * width_scale)``).
        units: units per stage, (6, 6, 8, 1) for SqNxt-23, (2, 4, 14, 1) for SqNxt-23v5;
            the first unit of stages 2 to 4 halves the resolution.
        in_channels: image channels.
        in_size: image height = width; the final pool averages the whole last map (pytorchcv's
            fixed 7×7 pool at 224).
        num_classes: outputs of the linear classifier.

    Shapes: ``(b, in_channels, in_size, in_size)`` → ``(b, num_classes)``.
    """

    def __init__(
        self,
        *,
        width_scale: float = 1.0,
        units: tuple[int, int, int, int] = (6, 6, 8, 1),
        in_channels: int = 3,
        in_size: int = 224,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.in_size = in_size
        self.num_classes = num_classes
        init_width, final_width = int(64 * width_scale), int(128 * width_scale)
        widths = [int(w * width_scale) for w in (32, 64, 128, 256)]
        self.features = nn.Sequential()
        self.features.add_module(
            "init_block", SqnxtInitBlock(in_channels=in_channels, out_channels=init_width)
        )
        channels = init_width
        for i, (width, count) in enumerate(zip(widths, units, strict=True)):
            stage = nn.Sequential()
            for j in range(count):
                stride = 2 if j == 0 and i != 0 else 1
                stage.add_module(
                    f"unit{j + 1}",
                    SqnxtUnit(in_channels=channels, out_channels=width, stride=stride),
                )
                channels = width
            self.features.add_module(f"stage{i + 1}", stage)
        self.features.add_module(
            "final_block", _conv(in_channels=channels, out_channels=final_width)
        )
        size = (in_size + 2 - 7) // 2 + 1  # stem conv
        size = -(-(size - 3) // 2) + 1  # stem pool, ceil_mode
        for _ in range(3):  # strided 1×1 convs of stages 2 to 4
            size = (size - 1) // 2 + 1
        self.features.add_module("final_pool", nn.AvgPool2d(kernel_size=size, stride=1))
        self.output = nn.Linear(final_width, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (b, c, 1, 1)
        return self.output(torch.flatten(x, 1))
