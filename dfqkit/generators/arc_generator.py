"""The AutoReCon (ARC) generator: a searched, three-cell upsampling architecture with categorical
conditional BN, as released with AIT (``AutoReCon_AIT``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfqkit.generators.base import Generator
from dfqkit.generators.conditional_generator import CategoricalConditionalBN
from dfqkit.registry import register
from dfqkit.step import SynthBatch

# Edge operations, upsampling nodes and cross-cell links, in the order of the released encoding.
OPS = ("none", "skip", "conv_1x1", "conv_3x3", "conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
UPS = ("nearest", "bilinear")
CROSS = ("none", "nearest", "bilinear")

# The searched architectures released with AIT (AutoReCon_AIT/generator_architecture.py), as the
# index of the chosen primitive per row: 6 upsampling nodes (2 per cell), 15 edges (5 per cell),
# 12 cross-cell links (6 per cell after the first).
ARCHITECTURES: dict[str, dict[str, tuple[int, ...]]] = {
    "cifar10": {
        "up": (0, 0, 0, 0, 1, 0),
        "op": (6, 0, 6, 5, 4, 6, 6, 3, 5, 6, 6, 6, 2, 4, 5),
        "cross": (0, 0, 2, 0, 0, 1, 1, 1, 1, 2, 2, 2),
    },
    "cifar100": {
        "up": (1, 0, 0, 0, 0, 0),
        "op": (6, 6, 6, 0, 4, 6, 4, 2, 5, 6, 6, 5, 4, 4, 6),
        "cross": (0, 2, 1, 0, 0, 1, 0, 2, 1, 1, 2, 2),
    },
    "resnet18": {
        "up": (1, 1, 1, 1, 1, 1),
        "op": (6, 6, 6, 6, 6, 6, 6, 6, 6, 5, 6, 6, 4, 5, 5),
        "cross": (1, 2, 1, 2, 2, 1, 2, 2, 1, 1, 2, 1),
    },
    "resnet50": {
        "up": (1, 1, 1, 1, 1, 1),
        "op": (6, 6, 6, 6, 6, 6, 6, 3, 2, 2, 5, 6, 6, 4, 5),
        "cross": (2, 2, 2, 1, 1, 2, 1, 1, 1, 1, 2, 2),
    },
    "mobilenet_v2": {
        "up": (1, 1, 1, 1, 0, 1),
        "op": (6, 6, 4, 6, 6, 4, 6, 2, 2, 2, 3, 6, 4, 6, 5),
        "cross": (2, 2, 1, 2, 2, 2, 2, 1, 2, 2, 2, 1),
    },
}


class _CBNAct(nn.Module):
    """Conditional BN (eps 0.8, as released) → LeakyReLU(0.2) → a layer."""

    def __init__(self, channels: int, num_classes: int, layer: nn.Module) -> None:
        super().__init__()
        self.norm = CategoricalConditionalBN(channels, num_classes, eps=0.8)
        self.layer = layer

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.layer(F.leaky_relu(self.norm(x, targets), 0.2))


class _Edge(nn.Module):
    """One searched edge: nothing (zero), identity, or CBN → LReLU → (dilated) convolution."""

    def __init__(self, op: str, channels: int, num_classes: int) -> None:
        super().__init__()
        self.kind = op
        if op in ("none", "skip"):
            self.body = None
            return
        kernel = int(op[-1])
        dilation = 2 if op.startswith("dil") else 1
        conv = nn.Conv2d(
            channels, channels, kernel, padding=dilation * (kernel // 2), dilation=dilation
        )
        self.body = _CBNAct(channels, num_classes, conv)

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return torch.zeros_like(x)
        if self.kind == "skip":
            return x
        return self.body(x, targets)


class _Up(nn.Module):
    """Upsample ×2 (``mode``) → CBN → LReLU → 1×1 convolution; ``mode="none"`` contributes zero
    (a cross link the search switched off)."""

    def __init__(self, mode: str, channels: int, num_classes: int) -> None:
        super().__init__()
        self.mode = mode
        self.body = (
            None
            if mode == "none"
            else _CBNAct(channels, num_classes, nn.Conv2d(channels, channels, 1))
        )

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.body is None:
            b, c, h, w = x.shape
            return x.new_zeros(b, c, 2 * h, 2 * w)
        return self.body(F.interpolate(x, scale_factor=2, mode=self.mode), targets)


class _Cell(nn.Module):
    """Two upsampled nodes ``n0, n1``; ``n2 = e0(n0) + e1(n1)``; ``n3 = e2(n0) + e3(n1) + e4(n2)``;
    after the first cell, ``n2`` and ``n3`` also receive the previous cell's ``n0, n1, n2``
    through three upsampling cross links each."""

    def __init__(self, ups, ops, cross, channels: int, num_classes: int) -> None:
        super().__init__()
        self.ups = nn.ModuleList(_Up(UPS[i], channels, num_classes) for i in ups)
        self.edges = nn.ModuleList(_Edge(OPS[i], channels, num_classes) for i in ops)
        self.cross = nn.ModuleList(_Up(CROSS[i], channels, num_classes) for i in cross)

    def forward(self, x, previous, targets):
        n0, n1 = (up(x, targets) for up in self.ups)
        e = self.edges
        n2 = e[0](n0, targets) + e[1](n1, targets)
        if self.cross:
            n2 = n2 + sum(
                link(p, targets) for link, p in zip(self.cross[:3], previous, strict=True)
            )
        n3 = e[2](n0, targets) + e[3](n1, targets) + e[4](n2, targets)
        if self.cross:
            n3 = n3 + sum(
                link(p, targets) for link, p in zip(self.cross[3:], previous, strict=True)
            )
        return n3, (n0, n1, n2)


@register("generators")
class ARCGenerator(Generator):
    """The AutoReCon generator (Zhu et al., 2021) in the searched form released with AIT.

    ``z`` is split in three; each part is projected to a ``64``-channel map at ``s/8``, ``s/4``
    and ``s/2`` and added to the input of cell 0, 1, 2. Every cell doubles the resolution; the
    class enters through categorical conditional BN (soft targets, so mixers work) before each
    operation. Output: CBN → LReLU → conv3×3 → tanh → BN(c, affine=False), in the teacher's
    normalized input space.

    ``arch`` names one of the released searches (``cifar10``, ``cifar100``, ``resnet18``,
    ``resnet50``, ``mobilenet_v2``) or gives the three index tuples (``{"up": 6, "op": 15,
    "cross": 12}`` entries; primitives in :data:`OPS`, :data:`UPS`, :data:`CROSS`). An image
    side that is not a multiple of 8 (the offline 28 px) is generated at the next multiple and
    centre-cropped (a dfqkit adaptation).

    Reference: Zhu et al., "AutoReCon", 2021; Choi et al., "It's All In the Teacher", CVPR 2022
    (the generator search released with the AIT code; docs/methods.md).

    Args:
        num_classes, image_size, channels: the images.
        latent_dim: size of ``z`` (split ⌊d/3⌋, ⌊d/3⌋, the rest).
        arch: a released search's name or the index tuples.
        width: channels of every node (the released 256 // 4 = 64).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        image_size: int = 32,
        channels: int = 3,
        latent_dim: int = 100,
        arch: str | dict = "cifar10",
        width: int = 64,
    ) -> None:
        super().__init__(num_classes=num_classes, latent_dim=latent_dim)
        if isinstance(arch, str):
            if arch not in ARCHITECTURES:
                raise ValueError(
                    f"ARCGenerator.arch must be one of {sorted(ARCHITECTURES)} or a dict, "
                    f"got {arch!r}"
                )
            arch = ARCHITECTURES[arch]
        sizes = {"up": (6, len(UPS)), "op": (15, len(OPS)), "cross": (12, len(CROSS))}
        for key, (rows, choices) in sizes.items():
            got = tuple(arch.get(key, ()))
            if len(got) != rows or not all(isinstance(i, int) and 0 <= i < choices for i in got):
                raise ValueError(
                    f"ARCGenerator.arch[{key!r}] needs {rows} indices in 0..{choices - 1}, "
                    f"got {got!r}"
                )
        if latent_dim < 3:
            raise ValueError(f"ARCGenerator.latent_dim must be >= 3, got {latent_dim}")
        self.image_size, self.channels = image_size, channels
        self.full = -(-image_size // 8) * 8
        bottom = self.full // 8
        self.parts = (latent_dim // 3, latent_dim // 3, latent_dim - 2 * (latent_dim // 3))
        self.width = width
        self.inputs = nn.ModuleList(
            nn.Linear(p, width * (bottom * 2**i) ** 2) for i, p in enumerate(self.parts)
        )
        self.bottoms = tuple(bottom * 2**i for i in range(3))
        up, op, cross = arch["up"], arch["op"], arch["cross"]
        self.cells = nn.ModuleList(
            _Cell(
                up[2 * i : 2 * i + 2],
                op[5 * i : 5 * i + 5],
                cross[6 * (i - 1) : 6 * i] if i else (),
                width,
                num_classes,
            )
            for i in range(3)
        )
        self.out_norm = CategoricalConditionalBN(width, num_classes, eps=0.8)
        self.to_image = nn.Conv2d(width, channels, 3, padding=1)
        self.out_bn = nn.BatchNorm2d(channels, affine=False)

    def embed(self, labels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z  # the class enters through conditional BN

    def decode(self, batch: SynthBatch) -> torch.Tensor:
        targets = batch.targets
        if targets is None:
            raise ValueError("ARCGenerator needs batch.targets (soft or one-hot labels)")
        targets = targets.to(batch.cond.dtype)
        z = torch.split(batch.cond, self.parts, dim=1)
        maps = [
            lin(part).view(-1, self.width, s, s)
            for lin, part, s in zip(self.inputs, z, self.bottoms, strict=True)
        ]
        x, previous = maps[0], ()
        for i, cell in enumerate(self.cells):
            x, previous = cell(x, previous, targets)
            if i + 1 < len(maps):
                x = x + maps[i + 1]
        x = F.leaky_relu(self.out_norm(x, targets), 0.2)
        x = self.out_bn(torch.tanh(self.to_image(x)))
        if self.full != self.image_size:
            off = (self.full - self.image_size) // 2
            x = x[:, :, off : off + self.image_size, off : off + self.image_size]
        return x
