"""The pytorchcv CIFAR ResNet architecture (module names identical, so its checkpoints load).

State-dict keys, as in pytorchcv's ``resnet20_cifar10``::

    features.init_block.{conv.weight, bn.*}
    features.stage{s}.unit{u}.body.conv{1,2}.{conv.weight, bn.*}
    features.stage{s}.unit1.identity_conv.{conv.weight, bn.*}   # where the shape changes
    output.{weight, bias}

Every ReLU is its own ``nn.ReLU`` module named ``activ`` and is called exactly once, so
"quantize after every ReLU module" (GDFQ placement) applies as is. ReLUs are not in-place, so
forward hooks that keep a BN output or a pre-activation sum see it unmodified.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ConvBlock(nn.Module):
    """Convolution → BatchNorm → optional ReLU (pytorchcv ``ConvBlock``; shared by dfqkit's
    pytorchcv-layout models). ``padding=None`` pads half the kernel on each side."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] | None = None,
        groups: int = 1,
        bias: bool = False,
        activation: bool = True,
    ) -> None:
        super().__init__()
        if padding is None:
            pair = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
            padding = (pair[0] // 2, pair[1] // 2)
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            groups=groups,
            bias=bias,
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.activ = nn.ReLU() if activation else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.activ(x) if self.activ is not None else x


class ResBlock(nn.Module):
    """Residual path: 3×3 conv block (strided, ReLU) → 3×3 conv block (no ReLU)."""

    def __init__(self, *, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBlock(
            in_channels=in_channels, out_channels=out_channels, kernel_size=3, stride=stride
        )
        self.conv2 = ConvBlock(
            in_channels=out_channels, out_channels=out_channels, kernel_size=3, activation=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class ResUnit(nn.Module):
    """``activ(body(x) + identity(x))``; identity is a 1×1 conv block where the shape changes."""

    def __init__(self, *, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.body = ResBlock(in_channels=in_channels, out_channels=out_channels, stride=stride)
        self.resize_identity = in_channels != out_channels or stride != 1
        if self.resize_identity:
            self.identity_conv = ConvBlock(
                in_channels=in_channels,
                out_channels=out_channels,
                kernel_size=1,
                stride=stride,
                activation=False,
            )
        self.activ = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.identity_conv(x) if self.resize_identity else x
        return self.activ(self.body(x) + identity)


class CIFARResNet(nn.Module):
    """CIFAR-style ResNet: 3×3 stem, three stages of BasicBlock units, average pool, linear.

    Args:
        blocks_per_stage: units per stage ((depth - 2) / 6; 3 for ResNet-20).
        widths: channels of the three stages; stage 1 keeps the resolution, stages 2 and 3
            halve it in their first unit.
        init_width: channels of the stem.
        in_channels: image channels.
        in_size: image height = width; the final pool averages the ``in_size / 4`` map.
        num_classes: outputs of the linear classifier.

    Shapes: ``(b, in_channels, in_size, in_size)`` → ``(b, num_classes)``.
    """

    def __init__(
        self,
        *,
        blocks_per_stage: int,
        widths: tuple[int, int, int] = (16, 32, 64),
        init_width: int = 16,
        in_channels: int = 3,
        in_size: int = 32,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.in_size = in_size
        self.num_classes = num_classes
        self.features = nn.Sequential()
        self.features.add_module(
            "init_block",
            ConvBlock(in_channels=in_channels, out_channels=init_width, kernel_size=3),
        )
        channels = init_width
        for i, width in enumerate(widths):
            stage = nn.Sequential()
            for j in range(blocks_per_stage):
                stride = 2 if j == 0 and i != 0 else 1
                stage.add_module(
                    f"unit{j + 1}",
                    ResUnit(in_channels=channels, out_channels=width, stride=stride),
                )
                channels = width
            self.features.add_module(f"stage{i + 1}", stage)
        # pytorchcv: AvgPool2d(8, stride=1) on CIFAR's 8×8 map, i.e. a global average pool.
        final_size = math.ceil(math.ceil(in_size / 2) / 2)  # after the two stride-2 stages
        self.features.add_module("final_pool", nn.AvgPool2d(kernel_size=final_size, stride=1))
        self.output = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (b, c, 1, 1)
        return self.output(torch.flatten(x, 1))
