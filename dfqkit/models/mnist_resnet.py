"""A small CIFAR-style ResNet for 28×28 MNIST digits: the offline testbed's CNN teacher."""

from __future__ import annotations

from torch import nn

from dfqkit.models.cifar_resnet import CIFARResNet
from dfqkit.models.weights import load_weights
from dfqkit.models.zoo_cache import trained_weights
from dfqkit.registry import register

ZOO_NAME = "mnist_resnet8"
ZOO_ARCH = {"depth": 8, "num_classes": 10, "in_channels": 1, "width": 16}


@register("models")
def mnist_resnet(
    *,
    depth: int = 8,
    num_classes: int = 10,
    in_channels: int = 1,
    width: int = 16,
    weights: str | None = "zoo",
) -> nn.Module:
    """ResNet-``depth`` with batch norm for MNIST: the CIFAR ResNet layout on 28×28 inputs.

    Stem conv3×3-BN-ReLU (``width`` channels), three stages of BasicBlock units with
    ``width``, ``2*width``, ``4*width`` channels and strides 1/2/2 ((depth - 2) / 6 units each),
    global average pool over the 7×7 map, linear classifier. Module names follow pytorchcv
    (see :mod:`dfqkit.models.cifar_resnet`); every ReLU is its own module, called once.

    Args:
        depth: 8, 14, 20, ... (``depth - 2`` divisible by 6).
        num_classes: classifier outputs.
        in_channels: image channels.
        width: channels of the stem and of stage 1.
        weights: ``"zoo"`` (default) loads the cached zoo teacher ``mnist_resnet8`` (only for
            the default architecture; create it with ``python -m dfqkit.zoo train
            mnist_resnet8``), ``None`` gives a random init, a path loads that checkpoint.

    Returns:
        The model in eval mode; ``(b, in_channels, 28, 28)`` → ``(b, num_classes)``.

    Raises:
        FileNotFoundError: ``weights="zoo"`` and the zoo teacher is not trained yet.
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 8, 14, 20, ... (depth - 2 divisible by 6), got {depth}")
    for field, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if value <= 0:
            raise ValueError(f"{field} must be a positive int, got {value!r}")
    if width <= 0:
        raise ValueError(f"width must be a positive int, got {width!r}")
    model = CIFARResNet(
        blocks_per_stage=(depth - 2) // 6,
        widths=(width, 2 * width, 4 * width),
        init_width=width,
        in_channels=in_channels,
        in_size=28,
        num_classes=num_classes,
    )
    if weights == "zoo":
        arch = {"depth": depth, "num_classes": num_classes, "in_channels": in_channels}
        if {**arch, "width": width} != ZOO_ARCH:
            raise ValueError(
                f"weights='zoo' holds {ZOO_NAME} ({ZOO_ARCH}), not depth={depth}, "
                f"num_classes={num_classes}, in_channels={in_channels}, width={width}; "
                "pass weights=None (random init) or a checkpoint path"
            )
        weights = str(trained_weights(ZOO_NAME))
    if weights is not None:
        load_weights(model, weights)
    return model.eval()
