"""pytorchcv's ImageNet ResNet, MobileNetV2 and InceptionV3 checkpoints, renamed to torchvision's
layout.

GDFQ, Qimera, AIT, ZeroQ, DSG, IntraQ and HAST report pytorchcv's ``resnet18``, ``resnet50``,
``mobilenetv2_w1`` and ``inceptionv3``. Given the same weights, torchvision's models compute the
same functions (same convs, paddings, poolings, BN eps, activations and concatenation orders; in
eval mode dropout is the identity and pytorchcv's fixed-size final average pool is the global
one at the native resolution) except where :func:`dfqkit.models.torchvision_model` is told to
build pytorchcv's variant:

- pytorchcv's ``resnet50``/``resnet101``/``resnet152`` stride a downsampling bottleneck in its
  first 1×1 conv, torchvision's in the 3×3 (as pytorchcv's ``resnet50b``...):
  ``kwargs={'stride_in_1x1': True}``. The keys cannot tell the two apart.
- pytorchcv's ``mobilenetv2_w1`` keeps a 1×1 expansion conv (+ BN + ReLU6) in the first
  inverted-residual block, whose expansion ratio is 1; torchvision's drops it (as pytorchcv's
  ``mobilenetv2b_w1`` does): ``kwargs={'first_expand_conv': True}``. pytorchcv's classifier is a
  bias-free 1×1 conv: it becomes the ``Linear`` with a zero bias.
- pytorchcv's ``inceptionv3`` takes the ImageNet-normalised input as it is:
  ``kwargs={'transform_input': False}``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn
from torchvision.models import Inception3, MobileNetV2, ResNet

# Every pytorchcv ImageNet model names its stem ``features.init_block``; torchvision none.
PYTORCHCV_STEM = "features.init_block."


def is_pytorchcv_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` has pytorchcv's layout (a ``features.init_block.*`` key)."""
    return any(k.startswith(PYTORCHCV_STEM) for k in state)


def _bad(key: str, family: str) -> ValueError:
    return ValueError(f"checkpoint key {key!r} is not part of a pytorchcv {family}")


_RES_STEM = re.compile(r"^features\.init_block\.conv\.(conv|bn)\.(.+)$")
_RES_BODY = re.compile(r"^features\.stage(\d+)\.unit(\d+)\.body\.conv(\d)\.(conv|bn)\.(.+)$")
_RES_SKIP = re.compile(r"^features\.stage(\d+)\.unit(\d+)\.identity_conv\.(conv|bn)\.(.+)$")


def pytorchcv_resnet_to_torchvision(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a pytorchcv ImageNet ResNet state dict (``features.stage1.unit1.body.conv1.conv``)
    to torchvision's ``ResNet`` layout (``layer1.0.conv1``).

    Raises:
        ValueError: a key fits neither layout (named in the message).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if found := _RES_STEM.match(key):
            new = f"{found[1]}1.{found[2]}"  # conv1 / bn1
        elif found := _RES_BODY.match(key):
            stage, unit, i, kind, rest = found.groups()
            new = f"layer{stage}.{int(unit) - 1}.{kind}{i}.{rest}"
        elif found := _RES_SKIP.match(key):
            stage, unit, kind, rest = found.groups()
            new = f"layer{stage}.{int(unit) - 1}.downsample.{int(kind == 'bn')}.{rest}"
        elif key in ("output.weight", "output.bias"):
            new = "fc." + key.split(".")[1]
        else:
            raise _bad(key, "ResNet")
        out[new] = value
    return out


_MB_UNIT = re.compile(r"^features\.stage(\d+)\.unit(\d+)\.conv([123])\.(conv|bn)\.(.+)$")
_MB_BLOCK = re.compile(r"^features\.(init_block|final_block)\.(conv|bn)\.(.+)$")


def pytorchcv_mobilenetv2_to_torchvision(
    state: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Rename a pytorchcv MobileNetV2 state dict (``features.stage2.unit1.conv1.conv``,
    ``output``) to torchvision's ``MobileNetV2`` layout (``features.2.conv.0.0``,
    ``classifier.1``). Units are numbered in order through the stages; a unit with an expansion
    conv (``conv1``) maps to ``conv.0``-``conv.3``, one without to ``conv.0``-``conv.2``. The
    bias-free 1×1-conv classifier becomes a ``Linear`` weight and a zero bias.

    Raises:
        ValueError: a key fits neither layout (named in the message).
    """
    units = sorted({(int(m[1]), int(m[2])) for k in state if (m := _MB_UNIT.match(k))})
    index = {unit: i for i, unit in enumerate(units, start=1)}  # features.0 is the stem
    expands = {(int(m[1]), int(m[2])) for k in state if (m := _MB_UNIT.match(k)) and m[3] == "1"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if found := _MB_BLOCK.match(key):
            block, kind, rest = found.groups()
            at = 0 if block == "init_block" else len(units) + 1
            new = f"features.{at}.{int(kind == 'bn')}.{rest}"
        elif found := _MB_UNIT.match(key):
            unit = (int(found[1]), int(found[2]))
            i, kind, rest = int(found[3]), found[4], found[5]
            at = i - 1 - (unit not in expands)  # position of the conv in ``conv``
            part = f"{at}.{int(kind == 'bn')}" if i < 3 else str(at + (kind == "bn"))
            new = f"features.{index[unit]}.conv.{part}.{rest}"
        elif key == "output.weight":  # (k, c, 1, 1) -> (k, c)
            new, value = "classifier.1.weight", value.flatten(1)
        elif key == "output.bias":
            new = "classifier.1.bias"
        else:
            raise _bad(key, "MobileNetV2")
        out[new] = value
    if "classifier.1.weight" in out and "classifier.1.bias" not in out:
        weight = out["classifier.1.weight"]
        out["classifier.1.bias"] = weight.new_zeros(weight.shape[0])
    return out


# pytorchcv InceptionV3: stage s, unit u -> torchvision's Mixed_* block; the first unit of
# stages 2 and 3 is a reduction unit (torchvision's InceptionB, InceptionD)
_INC_STEM = {"conv1": "Conv2d_1a_3x3", "conv2": "Conv2d_2a_3x3", "conv3": "Conv2d_2b_3x3",
             "conv4": "Conv2d_3b_1x1", "conv5": "Conv2d_4a_3x3"}  # fmt: skip
_INC_MIXED = {1: ("5b", "5c", "5d"), 2: ("6a", "6b", "6c", "6d", "6e"), 3: ("7a", "7b", "7c")}
_A = {
    "branch1.conv": "branch1x1",
    "branch2.conv_list.conv1": "branch5x5_1",
    "branch2.conv_list.conv2": "branch5x5_2",
    **{f"branch3.conv_list.conv{i}": f"branch3x3dbl_{i}" for i in (1, 2, 3)},
    "branch4.conv": "branch_pool",
}
_REDUCTION_A = {
    "branch1.conv_list.conv1": "branch3x3",
    **{f"branch2.conv_list.conv{i}": f"branch3x3dbl_{i}" for i in (1, 2, 3)},
}
_B = {
    "branch1.conv": "branch1x1",
    **{f"branch2.conv_list.conv{i}": f"branch7x7_{i}" for i in (1, 2, 3)},
    **{f"branch3.conv_list.conv{i}": f"branch7x7dbl_{i}" for i in (1, 2, 3, 4, 5)},
    "branch4.conv": "branch_pool",
}
_REDUCTION_B = {
    **{f"branch1.conv_list.conv{i}": f"branch3x3_{i}" for i in (1, 2)},
    **{f"branch2.conv_list.conv{i}": f"branch7x7x3_{i}" for i in (1, 2, 3, 4)},
}
_C = {  # the 3×3 of branches 2 and 3 is split into a 1×3 and a 3×1 conv, concatenated
    "branch1.conv": "branch1x1",
    "branch2.conv_list.conv1": "branch3x3_1",
    "branch2.conv1x3": "branch3x3_2a",
    "branch2.conv3x1": "branch3x3_2b",
    "branch3.conv_list.conv1": "branch3x3dbl_1",
    "branch3.conv_list.conv2": "branch3x3dbl_2",
    "branch3.conv1x3": "branch3x3dbl_3a",
    "branch3.conv3x1": "branch3x3dbl_3b",
    "branch4.conv": "branch_pool",
}
_INC_BRANCHES = {1: (_A, _A), 2: (_REDUCTION_A, _B), 3: (_REDUCTION_B, _C)}  # (unit 1, others)
_INC_INIT = re.compile(r"^features\.init_block\.(conv\d)\.(conv|bn)\.(.+)$")
_INC_UNIT = re.compile(r"^features\.stage(\d)\.unit(\d)\.branches\.(.+)\.(conv|bn)\.([^.]+)$")


def pytorchcv_inceptionv3_to_torchvision(
    state: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Rename a pytorchcv InceptionV3 state dict (``features.stage1.unit1.branches.branch2
    .conv_list.conv1.conv``) to torchvision's ``Inception3`` layout (``Mixed_5b.branch5x5_1
    .conv``). pytorchcv's has no auxiliary classifier: build torchvision's with
    ``aux_logits=False``.

    Raises:
        ValueError: a key fits neither layout (named in the message).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = None
        if (found := _INC_INIT.match(key)) and found[1] in _INC_STEM:
            new = f"{_INC_STEM[found[1]]}.{found[2]}.{found[3]}"
        elif found := _INC_UNIT.match(key):
            stage, unit, branch, kind, rest = found.groups()
            mixed = _INC_MIXED.get(int(stage), ())
            if 1 <= int(unit) <= len(mixed):
                table = _INC_BRANCHES[int(stage)][int(unit) > 1]
                if branch in table:
                    new = f"Mixed_{mixed[int(unit) - 1]}.{table[branch]}.{kind}.{rest}"
        elif key in ("output.fc.weight", "output.fc.bias"):
            new = key[len("output.") :]
        if new is None:
            raise _bad(key, "InceptionV3")
        out[new] = value
    return out


def pytorchcv_to_torchvision(
    model: nn.Module, state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename a pytorchcv-layout ``state`` for torchvision's ``model`` (a ``ResNet``,
    ``MobileNetV2`` or ``Inception3``).

    Raises:
        ValueError: ``model`` is another architecture; a key fits neither layout; a
            MobileNetV2 checkpoint has an expansion conv where ``model`` has none; an
            ``Inception3`` transforms its input or has an auxiliary classifier.
    """
    if isinstance(model, ResNet):
        return pytorchcv_resnet_to_torchvision(state)
    if isinstance(model, Inception3):
        if model.transform_input or model.AuxLogits is not None:
            raise ValueError(
                "pytorchcv's inceptionv3 takes the ImageNet-normalised input as it is and has no "
                "auxiliary classifier: build the model with kwargs={'transform_input': False, "
                f"'aux_logits': False}}, got transform_input={model.transform_input}, "
                f"aux_logits={model.aux_logits}"
            )
        return pytorchcv_inceptionv3_to_torchvision(state)
    if not isinstance(model, MobileNetV2):
        raise ValueError(
            f"the checkpoint has pytorchcv's layout (features.init_block.*), which dfqkit renames "
            f"for torchvision's ResNet, MobileNetV2 and Inception3 only, not {type(model).__name__}"
        )
    out = pytorchcv_mobilenetv2_to_torchvision(state)
    for i, block in enumerate(model.features):
        extra = f"features.{i}.conv.3.weight"
        if extra in out and len(getattr(block, "conv", ())) == 3:
            raise ValueError(
                f"the checkpoint's MobileNetV2 block {i} has a 1×1 expansion conv (pytorchcv's "
                "mobilenetv2_w1 keeps one in the first block) that the model lacks: build it "
                "with kwargs={'first_expand_conv': True}"
            )
    return out
