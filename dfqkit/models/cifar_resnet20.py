"""ResNet-20 for CIFAR, compatible with pytorchcv's ``resnet20_cifar10/100`` checkpoints."""

from __future__ import annotations

from torch import nn

from dfqkit.models.cifar_resnet import CIFARResNet
from dfqkit.models.weights import load_weights
from dfqkit.registry import register

# Parameter count, by hand (conv: k*k*c_in*c_out, no bias; BN: 2*c weight+bias):
#   init_block        3*3*3*16 + 2*16                                   =     464
#   stage1 (3 units)  3 * 2 * (3*3*16*16 + 2*16)                        =  14,016
#   stage2 unit1      (3*3*16*32 + 64) + (3*3*32*32 + 64) + (16*32 + 64) =  14,528
#   stage2 unit2, 3   2 * 2 * (3*3*32*32 + 64)                          =  37,120
#   stage3 unit1      (3*3*32*64 + 128) + (3*3*64*64 + 128) + (32*64 + 128) = 57,728
#   stage3 unit2, 3   2 * 2 * (3*3*64*64 + 128)                         = 147,968
#   features total                                                      = 271,824
#   output            64*k + k:  k=10 → 650,  k=100 → 6,500
#   total             k=10 → 272,474 (0.27M);  k=100 → 278,324
PARAMS = {10: 272_474, 100: 278_324}


@register("models")
def cifar_resnet20(*, num_classes: int = 100, weights: str | None = None) -> nn.Module:
    """ResNet-20 for 32×32 CIFAR images, module-for-module pytorchcv's ``resnet20_cifar*``.

    Reference: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016; the
    architecture and names of pytorchcv (the FP teachers of GDFQ and its successors: 93.89 %
    CIFAR-10, 70.33 % CIFAR-100), so its published checkpoints load without pytorchcv.

    Args:
        num_classes: 10 (CIFAR-10) or 100 (CIFAR-100); any positive count is accepted.
        weights: ``None`` for a random init, or a local checkpoint path (``.safetensors`` or a
            ``torch.save`` state dict, e.g. pytorchcv's ``resnet20_cifar100-*.pth``).

    Returns:
        The model in eval mode; ``(b, 3, 32, 32)`` → ``(b, num_classes)``.
    """
    if num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    model = CIFARResNet(blocks_per_stage=3, in_channels=3, in_size=32, num_classes=num_classes)
    if weights is not None:
        load_weights(model, weights)
    return model.eval()
