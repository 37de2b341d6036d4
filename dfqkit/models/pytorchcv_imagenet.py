"""MobileNet v1, ShuffleNet v1 and SqueezeNext-23 ×2, compatible with pytorchcv's ImageNet
checkpoints.

ZeroQ and DSG report pytorchcv's ``shufflenet_g1_w1`` (FP 65.07) and ``sqnxt23_w2`` (FP 69.38),
IntraQ its ``mobilenet_w1``; torchvision has none of them (timm's MobileNet v1 has another
layout). The classes in :mod:`dfqkit.models.mobilenet_v1`, :mod:`dfqkit.models.shufflenet` and
:mod:`dfqkit.models.squeezenext` have pytorchcv's module names, shapes and forward, so its
released checkpoints load as they are, without pytorchcv installed.
"""

from __future__ import annotations

from torch import nn

from dfqkit.models.mobilenet_v1 import MobileNetV1
from dfqkit.models.shufflenet import ShuffleNet
from dfqkit.models.squeezenext import SqueezeNext
from dfqkit.models.weights import load_weights
from dfqkit.registry import register

# shufflenet_g1_w1, by hand (conv: c_in/groups*c_out*k*k, no bias; BN: 2*c; mid = out/4; the
# body of a downsampling unit makes out - in channels; with 1 group no conv is split but the
# 3×3 depthwise, mid*9):
#   init_block        3*3*3*24 + 2*24                                           =       696
#   stage1 unit1      24*36 + 72 + 36*9 + 72 + 36*120 + 240                     =     5,892
#   stage1 unit2-4    3 * (144*36 + 72 + 36*9 + 72 + 36*144 + 288)              =    33,372
#   stage2 unit1      144*72 + 144 + 72*9 + 144 + 72*144 + 288                  =    21,960
#   stage2 unit2-8    7 * (288*72 + 144 + 72*9 + 144 + 72*288 + 576)            =   300,888
#   stage3 unit1      288*144 + 288 + 144*9 + 288 + 144*288 + 576               =    85,392
#   stage3 unit2-4    3 * (576*144 + 288 + 144*9 + 288 + 144*576 + 1152)        =   506,736
#   output            576*k + k                                      k=1000 →   577,000
#   total                                                            k=1000 → 1,531,936
SHUFFLENET_G1_W1_PARAMS = 1_531_936  # pytorchcv's shufflenet._test asserts the same

# sqnxt23_w2, by hand (every conv block: conv with bias + BN, so c_out*(c_in*k_h*k_w + 3); a
# unit with reduction r has mid = c/r, narrow = c/2r; widths stem 128, stages 64/128/256/512,
# final 256):
#   init_block        128*(3*49 + 3)                                            =    19,200
#   stage1 unit1      r=4, 128→64: 32*131 + 16*35 + 32*51 + 32*99 + 64*35 + 64*131 =  20,176
#   stage1 unit2-6    r=2, 64→64: 5 * (32*67 + 16*35 + 32*51 + 32*99 + 64*35)  =    48,720
#   stage2 unit1      r=1, 64→128: 64*67 + 32*67 + 64*99 + 64*195 + 128*67 + 128*67 = 42,400
#   stage2 unit2-6    r=2: 5 * (64*131 + 32*67 + 64*99 + 64*195 + 128*67)      =   189,600
#   stage3 unit1      r=1, 128→256: 128*131 + 64*131 + 128*195 + 128*387
#                     + 256*131 + 256*131                                       =   166,720
#   stage3 unit2-8    r=2: 7 * (128*259 + 64*131 + 128*195 + 128*387 + 256*131) = 1,046,976
#   stage4 unit1      r=1, 256→512: 256*259 + 128*259 + 256*387 + 256*771
#                     + 512*259 + 512*259                                       =   661,120
#   final_block       256*(512 + 3)                                             =   131,840
#   output            256*k + k                                      k=1000 →   257,000
#   total                                                            k=1000 → 2,583,752
SQNXT23_W2_PARAMS = 2_583_752  # pytorchcv's squeezenext._test asserts the same


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


def _loaded(model: nn.Module, weights: str | None) -> nn.Module:
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


@register("models")
def shufflenet_g1_w1(*, num_classes: int = 1000, weights: str | None = None) -> nn.Module:
    """ShuffleNet v1 (1 group, width 1.0) for 224×224 images, pytorchcv's ``shufflenet_g1_w1``.

    Reference: Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network
    for Mobile Devices", CVPR 2018; pytorchcv's layout (FP 65.07 % top-1, the teacher of ZeroQ
    and DSG), so its checkpoint ``shufflenet_g1_w1-*.pth`` loads without pytorchcv.

    Args:
        num_classes: outputs of the classifier (1000 for ImageNet).
        weights: ``None`` for a random init, or a local checkpoint path (``.safetensors`` or a
            ``torch.save`` state dict).

    Returns:
        The model in eval mode; ``(b, 3, 224, 224)`` → ``(b, num_classes)``.
    """
    _check_num_classes(num_classes)
    return _loaded(ShuffleNet(groups=1, in_size=224, num_classes=num_classes), weights)


@register("models")
def sqnxt23_w2(*, num_classes: int = 1000, weights: str | None = None) -> nn.Module:
    """SqueezeNext-23 (width 2.0) for 224×224 images, pytorchcv's ``sqnxt23_w2``.

    Reference: Gholami et al., "SqueezeNext: Hardware-Aware Neural Network Design", CVPR
    Workshops 2018; pytorchcv's layout (FP 69.38 % top-1, the teacher of ZeroQ and DSG), so its
    checkpoint ``sqnxt23_w2-*.pth`` loads without pytorchcv.

    Args:
        num_classes: outputs of the classifier (1000 for ImageNet).
        weights: ``None`` for a random init, or a local checkpoint path (``.safetensors`` or a
            ``torch.save`` state dict).

    Returns:
        The model in eval mode; ``(b, 3, 224, 224)`` → ``(b, num_classes)``.
    """
    _check_num_classes(num_classes)
    model = SqueezeNext(width_scale=2.0, units=(6, 6, 8, 1), in_size=224, num_classes=num_classes)
    return _loaded(model, weights)


@register("models")
def mobilenet_w1(*, num_classes: int = 1000, weights: str | None = None) -> nn.Module:
    """MobileNet v1 (width 1.0) for 224×224 images, pytorchcv's ``mobilenet_w1``.

    Reference: Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile
    Vision Applications", 2017; pytorchcv's layout (the MobileNetV1 teacher of IntraQ and
    HAST), so its checkpoint ``mobilenet_w1-*.pth`` loads without pytorchcv.

    Args:
        num_classes: outputs of the classifier (1000 for ImageNet).
        weights: ``None`` for a random init, or a local checkpoint path (``.safetensors`` or a
            ``torch.save`` state dict).

    Returns:
        The model in eval mode; ``(b, 3, 224, 224)`` → ``(b, num_classes)``.
    """
    _check_num_classes(num_classes)
    return _loaded(MobileNetV1(in_size=224, num_classes=num_classes), weights)
