"""GDFQ's conditional generator (CIFAR form: label embedding × z; ImageNet form: conditional BN)."""

from __future__ import annotations

import torch
from torch import nn

from dfqkit.generators.base import Generator
from dfqkit.generators.upsample_conv import UpsampleConv2d
from dfqkit.registry import register
from dfqkit.step import SynthBatch

CONDITIONINGS = ("embed_mul", "cbn")


class CategoricalConditionalBN(nn.Module):
    """BatchNorm2d without affine, then per-class scale/shift mixed by soft targets.

    ``γ = targets @ Γ``, ``β = targets @ Β`` with ``Γ (k, c)`` initialised to 1 and ``Β`` to 0,
    so a one-hot target picks its class's affine (GDFQ's categorical CBN) and a soft target
    blends them.
    """

    def __init__(self, num_features: int, num_classes: int, *, eps: float = 1e-5) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, affine=False)
        self.gamma = nn.Parameter(torch.ones(num_classes, num_features))
        self.beta = nn.Parameter(torch.zeros(num_classes, num_features))

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        gamma = (targets @ self.gamma)[:, :, None, None]  # (b, c, 1, 1)
        beta = (targets @ self.beta)[:, :, None, None]
        return self.bn(x) * gamma + beta


@register("generators")
class ConditionalGenerator(Generator):
    """DCGAN-style conditional generator used by GDFQ and its forks.

    ``cond → Linear → (128, s/4, s/4) → BN → up×2 → conv3×3 128 → BN(eps) → LReLU(0.2) → up×2 →
    conv3×3 64 → BN(eps) → LReLU(0.2) → conv3×3 c → tanh → BN(c, affine=False)``. The output is in
    the teacher's normalized input space (no clamping). Each ``up×2 → conv3×3`` pair runs as one
    :class:`UpsampleConv2d` (the same function at 16/36 of the multiply-adds).

    Args:
        num_classes: number of classes ``k``.
        image_size: output side ``s``. When ``s`` is not a multiple of 4 (InceptionV3's 299)
            the seed is ``⌈s/4⌉`` and the centre ``s × s`` of the ``4⌈s/4⌉`` map enters the
            last conv (GUESS: GDFQ's released code seeds ``⌊s/4⌋`` and so makes ``4⌊s/4⌋``
            images, 296 for 299; cropping keeps the images the size the data has).
        channels: output channels ``c``.
        latent_dim: size of z (and of the label embedding).
        conditioning: ``"embed_mul"`` (CIFAR form: ``cond = Emb(y) ⊙ z``) or ``"cbn"`` (ImageNet
            form: ``cond = z``, the label enters through categorical conditional BN in the first
            three BN layers; suited to many classes).
        bn_eps: eps of the two inner BN layers; GDFQ passes 0.8 positionally where momentum was
            meant, so it lands in eps: keep 0.8 to match the official code.
        width: channels of the first feature map (128 in GDFQ).

    Reference: Xu et al., "Generative Low-bitwidth Data Free Quantization", ECCV 2020.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        image_size: int = 32,
        channels: int = 3,
        latent_dim: int = 100,
        conditioning: str = "embed_mul",
        bn_eps: float = 0.8,
        width: int = 128,
    ) -> None:
        super().__init__(num_classes=num_classes, latent_dim=latent_dim)
        if image_size < 4:
            raise ValueError(f"image_size must be an int >= 4, got {image_size}")
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
        self.image_size, self.channels, self.conditioning = image_size, channels, conditioning
        self.init_size = -(-image_size // 4)  # ceil: 4·init_size >= image_size
        self._crop = (4 * self.init_size - image_size) // 2
        half = width // 2
        cbn = conditioning == "cbn"
        if not cbn:
            self.label_emb = nn.Embedding(num_classes, latent_dim)
        self.l1 = nn.Linear(latent_dim, width * self.init_size**2)

        def norm(c: int, eps: float) -> nn.Module:
            if cbn:
                return CategoricalConditionalBN(c, num_classes, eps=eps)
            return nn.BatchNorm2d(c, eps=eps)

        self.bn0 = norm(width, 1e-5)
        # up×2 → conv3×3, computed at low resolution (same function, 16/36 of the work)
        self.conv1 = UpsampleConv2d(width, width)
        self.bn1 = norm(width, bn_eps)
        self.conv2 = UpsampleConv2d(width, half)
        self.bn2 = norm(half, bn_eps)
        self.act = nn.LeakyReLU(0.2, inplace=True)
        self.conv3 = nn.Conv2d(half, channels, 3, stride=1, padding=1)
        self.out_bn = nn.BatchNorm2d(channels, affine=False)

    def embed(self, labels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.conditioning == "cbn":
            return z
        return self.label_emb(labels) * z

    def _norm(self, layer: nn.Module, x: torch.Tensor, batch: SynthBatch) -> torch.Tensor:
        if isinstance(layer, CategoricalConditionalBN):
            targets = batch.targets
            if targets is None:
                raise ValueError("conditional BN needs batch.targets (soft or one-hot labels)")
            return layer(x, targets.to(x.dtype))
        return layer(x)

    def decode(self, batch: SynthBatch) -> torch.Tensor:
        x = self.l1(batch.cond).view(
            -1, self.l1.out_features // self.init_size**2, self.init_size, self.init_size
        )
        x = self._norm(self.bn0, x, batch)  # (b, w, s/4, s/4)
        x = self.act(self._norm(self.bn1, self.conv1(x), batch))  # (b, w, s/2, s/2)
        x = self.act(self._norm(self.bn2, self.conv2(x), batch))  # (b, w/2, 4⌈s/4⌉, 4⌈s/4⌉)
        if x.shape[-1] != self.image_size:  # s not a multiple of 4: the centre s × s
            c, s = self._crop, self.image_size
            x = x[..., c : c + s, c : c + s]
        return self.out_bn(torch.tanh(self.conv3(x)))  # (b, c, s, s)
