"""ShuffleNet v1 for ImageNet, module for module pytorchcv's ``shufflenet_g{1,2,3,4,8}_w1``.

State-dict keys, as in pytorchcv (no convolution has a bias)::

    features.init_block.{conv.weight, bn.*}                       # 3×3/2 conv, BN, ReLU, max pool
    features.stage{s}.unit{u}.compress_conv1.weight, .compress_bn1.*  # 1×1, grouped
    features.stage{s}.unit{u}.dw_conv2.weight, .dw_bn2.*              # 3×3 depthwise
    features.stage{s}.unit{u}.expand_conv3.weight, .expand_bn3.*      # 1×1, grouped
    output.{weight, bias}

pytorchcv calls one ReLU module (``activ``) twice per unit. Here the first call site has its own
module, ``compress_activ1`` (a ReLU holds no state, so the keys are unchanged): every ReLU runs
exactly once per forward, and "a quantizer after every ReLU module" puts one quantizer at each
site. ZeroQ's and GDFQ's own module rewrite would share a single quantizer (and its range)
between the two sites of a unit. ReLUs are not in place, so hooks on BN outputs see them
unmodified.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

# Output channels of the three stages for each group count (the paper's Table 1, width 1.0).
STAGE_WIDTHS: dict[int, tuple[int, int, int]] = {
    1: (144, 288, 576),
    2: (200, 400, 800),
    3: (240, 480, 960),
    4: (272, 544, 1088),
    8: (384, 768, 1536),
}


class ChannelShuffle(nn.Module):
    """Interleave ``groups`` channel groups: channel ``c·groups + g`` of the output is channel
    ``g·(channels/groups) + c`` of the input (pytorchcv ``ChannelShuffle``; identity for 1 group).
    """

    def __init__(self, *, channels: int, groups: int) -> None:
        super().__init__()
        if channels % groups != 0:
            raise ValueError(f"channels ({channels}) must be divisible by groups ({groups})")
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, c, h, w) -> (b, c, h, w)``, channels permuted."""
        return rearrange(x, "b (g c) h w -> b (c g) h w", g=self.groups)


class ShuffleUnit(nn.Module):
    """Grouped 1×1 (compress, ReLU) → shuffle → 3×3 depthwise → grouped 1×1 (expand), then
    ``activ(body + x)``, or, downsampling, ``activ(cat(body, avgpool3×3/2(x)))``.

    The body of a downsampling unit makes ``out_channels - in_channels`` channels, so that the
    concatenation has ``out_channels``; the bottleneck is ``out_channels // 4`` either way.
    ``ignore_group`` makes the compress conv ungrouped (the first unit of the network, whose
    input, 24 channels, is too narrow to split).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        groups: int,
        downsample: bool,
        ignore_group: bool,
    ) -> None:
        super().__init__()
        self.downsample = downsample
        mid = out_channels // 4
        body_out = out_channels - in_channels if downsample else out_channels
        self.compress_conv1 = nn.Conv2d(
            in_channels, mid, kernel_size=1, groups=1 if ignore_group else groups, bias=False
        )
        self.compress_bn1 = nn.BatchNorm2d(mid)
        self.compress_activ1 = nn.ReLU()
        self.c_shuffle = ChannelShuffle(channels=mid, groups=groups)
        self.dw_conv2 = nn.Conv2d(
            mid,
            mid,
            kernel_size=3,
            stride=2 if downsample else 1,
            padding=1,
            groups=mid,
            bias=False,
        )
        self.dw_bn2 = nn.BatchNorm2d(mid)  # no ReLU after the depthwise conv
        self.expand_conv3 = nn.Conv2d(mid, body_out, kernel_size=1, groups=groups, bias=False)
        self.expand_bn3 = nn.BatchNorm2d(body_out)
        if downsample:
            self.avgpool = nn.AvgPool2d(kernel_size=3, stride=2, padding=1)
        self.activ = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, c_in, h, w) -> (b, c_out, h', w')``, ``h' = ⌈h/2⌉`` when downsampling."""
        y = self.compress_activ1(self.compress_bn1(self.compress_conv1(x)))
        y = self.dw_bn2(self.dw_conv2(self.c_shuffle(y)))
        y = self.expand_bn3(self.expand_conv3(y))
        if self.downsample:
            return self.activ(torch.cat((y, self.avgpool(x)), dim=1))
        return self.activ(y + x)


class ShuffleInitBlock(nn.Module):
    """3×3/2 conv (no bias) → BN → ReLU → 3×3/2 max pool (padding 1): a quarter of the size."""

    def __init__(self, *, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.activ = nn.ReLU()
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, c_in, h, w) -> (b, c_out, ⌈⌈h/2⌉/2⌉, ...)``."""
        return self.pool(self.activ(self.bn(self.conv(x))))


class ShuffleNet(nn.Module):
    """ShuffleNet v1 (width 1.0): stem, three stages of shuffle units, average pool, linear.

    Args:
        groups: groups of the 1×1 convolutions, a key of :data:`STAGE_WIDTHS`.
        units: units per stage; the first unit of each stage halves the resolution.
        init_width: channels of the stem.
        in_channels: image channels.
        in_size: image height = width; the final pool averages the ``in_size / 32`` map
            (pytorchcv's fixed 7×7 pool at 224).
        num_classes: outputs of the linear classifier.

    Shapes: ``(b, in_channels, in_size, in_size)`` → ``(b, num_classes)``.
    """

    def __init__(
        self,
        *,
        groups: int = 1,
        units: tuple[int, int, int] = (4, 8, 4),
        init_width: int = 24,
        in_channels: int = 3,
        in_size: int = 224,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        if groups not in STAGE_WIDTHS:
            raise ValueError(f"groups must be one of {sorted(STAGE_WIDTHS)}, got {groups!r}")
        self.in_size = in_size
        self.num_classes = num_classes
        self.features = nn.Sequential()
        self.features.add_module(
            "init_block", ShuffleInitBlock(in_channels=in_channels, out_channels=init_width)
        )
        channels = init_width
        for i, (width, count) in enumerate(zip(STAGE_WIDTHS[groups], units, strict=True)):
            stage = nn.Sequential()
            for j in range(count):
                unit = ShuffleUnit(
                    in_channels=channels,
                    out_channels=width,
                    groups=groups,
                    downsample=j == 0,
                    ignore_group=i == 0 and j == 0,
                )
                stage.add_module(f"unit{j + 1}", unit)
                channels = width
            self.features.add_module(f"stage{i + 1}", stage)
        # stem conv, stem pool, three downsampling units: each ⌈s/2⌉, together ⌈s/32⌉
        final_size = -(-in_size // 32)
        self.features.add_module("final_pool", nn.AvgPool2d(kernel_size=final_size, stride=1))
        self.output = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (b, c, 1, 1)
        return self.output(torch.flatten(x, 1))
