"""A small ViT (no batch norm) for 28×28 MNIST digits: the offline testbed's ViT teacher."""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dfqkit.models.weights import load_weights
from dfqkit.models.zoo_cache import trained_weights
from dfqkit.registry import register

ZOO_NAME = "mnist_vit"
ZOO_ARCH = {"num_classes": 10, "in_channels": 1, "embed_dim": 64, "depth": 4, "num_heads": 4}


@register("models")
def mnist_vit(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    embed_dim: int = 64,
    depth: int = 4,
    num_heads: int = 4,
    weights: str | None = "zoo",
) -> nn.Module:
    """A timm ``VisionTransformer`` on 28×28 inputs with 7×7 patches (16 patch tokens + CLS).

    LayerNorm only (no BN), MLP ratio 2, the CLS token feeds the head: the same module classes
    as DeiT, so every ViT code path (taps, the ``vit`` placement policy, PSAQ-ViT) runs offline
    on it.

    Args:
        num_classes: classifier outputs.
        in_channels: image channels.
        embed_dim: token width (divisible by ``num_heads``).
        depth: encoder blocks.
        num_heads: attention heads.
        weights: ``"zoo"`` (default) loads the cached zoo teacher ``mnist_vit`` (default
            architecture only; create it with ``python -m dfqkit.zoo train mnist_vit``),
            ``None`` gives a random init, a path loads that checkpoint.

    Returns:
        The model in eval mode; ``(b, in_channels, 28, 28)`` → ``(b, num_classes)``.
    """
    for field, value in (
        ("num_classes", num_classes),
        ("in_channels", in_channels),
        ("embed_dim", embed_dim),
        ("depth", depth),
        ("num_heads", num_heads),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{field} must be a positive int, got {value!r}")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
    model = VisionTransformer(
        img_size=28,
        patch_size=7,
        in_chans=in_channels,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=2.0,
        global_pool="token",
    )
    if weights == "zoo":
        arch = {
            "num_classes": num_classes,
            "in_channels": in_channels,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
        }
        if arch != ZOO_ARCH:
            raise ValueError(
                f"weights='zoo' holds {ZOO_NAME} ({ZOO_ARCH}), not {arch}; pass weights=None "
                "(random init) or a checkpoint path"
            )
        weights = str(trained_weights(ZOO_NAME))
    if weights is not None:
        load_weights(model, weights)
    return model.eval()
