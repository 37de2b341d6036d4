"""Any torchvision classification model by name, with local weights.

Beside torchvision's own names, two architectures the PTQ papers report that torchvision has no
builder for are built from torchvision's classes: ``regnet_x_600mf`` (pycls RegNetX-600MF, as in
BRECQ and Genie) and ``mnasnet2_0`` (MnasNet with depth multiplier 2.0, as in BRECQ and Genie).
Checkpoints in pycls's RegNet layout (BRECQ's ``regnet_600m.pth.tar``, ``regnet_3200m.pth.tar``)
are renamed to torchvision's layout on load; BRECQ's MnasNet-2.0 checkpoint already has
torchvision's layout. So are pytorchcv's ResNet, MobileNetV2 and InceptionV3 checkpoints (the
teachers of GDFQ and its successors, ZeroQ and DSG; :mod:`dfqkit.models.pytorchcv_keys`), with
two options that build pytorchcv's variants of torchvision's architectures: ``stride_in_1x1``
and ``first_expand_conv`` (see :data:`OPTIONS`).
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.mnasnet import MNASNet
from torchvision.models.mobilenetv2 import MobileNetV2
from torchvision.models.regnet import BlockParams, RegNet
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops.misc import Conv2dNormActivation

from dfqkit.models.pytorchcv_keys import is_pytorchcv_layout, pytorchcv_to_torchvision
from dfqkit.models.weights import load_weights
from dfqkit.registry import register

HUB = "hub"
# Auxiliary classifiers a model may be built without (``aux_logits=False``): their checkpoint
# keys are dropped on load, since they take no part in the evaluated forward pass.
AUX_HEADS: tuple[str, ...] = ("AuxLogits", "aux1", "aux2")


def _regnet_x_600mf(**kwargs: Any) -> nn.Module:
    # pycls RegNetX-600MF: depth 16, w_0 48, w_a 36.97, w_m 2.24, group width 24, no SE
    # (stage widths 48/96/240/528, depths 1/3/5/7); torchvision's RegNet class is pycls's design.
    params = BlockParams.from_init_params(depth=16, w_0=48, w_a=36.97, w_m=2.24, group_width=24)
    return RegNet(params, **kwargs)


def _mnasnet2_0(**kwargs: Any) -> nn.Module:
    return MNASNet(2.0, **kwargs)


EXTRA_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "regnet_x_600mf": _regnet_x_600mf,
    "mnasnet2_0": _mnasnet2_0,
}


def _stride_in_1x1(model: nn.Module) -> None:
    # The original ResNet (pytorchcv's resnet50/101/152, GDFQ's teacher) strides a downsampling
    # bottleneck in its first 1×1 conv; torchvision's ("v1.5") in the 3×3 conv.
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    if not isinstance(model, ResNet) or not blocks:
        raise ValueError(
            "kwargs['stride_in_1x1'] needs a bottleneck ResNet (resnet50, resnet101, ...), "
            f"got {type(model).__name__} without Bottleneck blocks"
        )
    for block in blocks:
        if block.conv2.stride != (1, 1):
            block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)


def _first_expand_conv(model: nn.Module) -> None:
    # pytorchcv's mobilenetv2_w1 keeps a 1×1 "expansion" conv + BN + ReLU6 (32 -> 32 channels)
    # in the first block, whose expansion ratio is 1; torchvision's builds none there.
    block = model.features[1] if isinstance(model, MobileNetV2) else None
    if block is None or len(block.conv) != 3:
        raise ValueError(
            "kwargs['first_expand_conv'] needs a MobileNetV2 whose first block has no expansion "
            f"conv, got {type(model).__name__}"
        )
    channels = block.conv[0][0].in_channels
    expand = Conv2dNormActivation(
        channels, channels, kernel_size=1, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6
    )
    block.conv = nn.Sequential(expand, *block.conv)


# dfqkit's own ``kwargs``, applied after the builder: pytorchcv's variants of two architectures.
OPTIONS: dict[str, Callable[[nn.Module], None]] = {
    "stride_in_1x1": _stride_in_1x1,
    "first_expand_conv": _first_expand_conv,
}


def classification_models() -> list[str]:
    """Names of torchvision's image-classification models, plus :data:`EXTRA_ARCHITECTURES`."""
    return sorted(
        torchvision.models.list_models(module=torchvision.models) + list(EXTRA_ARCHITECTURES)
    )


_PYCLS_BLOCK = re.compile(r"^s(\d+)\.b(\d+)\.(.*)$")
_PYCLS_PARTS = {  # pycls block sub-module -> torchvision block sub-module
    "proj.": "proj.0.", "bn.": "proj.1.",
    "f.a.": "f.a.0.", "f.a_bn.": "f.a.1.",
    "f.b.": "f.b.0.", "f.b_bn.": "f.b.1.",
    "f.c.": "f.c.0.", "f.c_bn.": "f.c.1.",
    "f.se.f_ex.0.": "f.se.fc1.", "f.se.f_ex.2.": "f.se.fc2.",
}  # fmt: skip


def pycls_regnet_to_torchvision(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a pycls-layout RegNet state dict (``stem.conv``, ``s1.b1.f.a``, ``head.fc``; the
    layout of BRECQ's and pycls's released checkpoints) to torchvision's ``RegNet`` layout
    (``stem.0``, ``trunk_output.block1.block1-0.f.a.0``, ``fc``).

    Raises:
        ValueError: a key fits neither layout (named in the message).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("stem.conv."):
            new = "stem.0." + key[len("stem.conv.") :]
        elif key.startswith("stem.bn."):
            new = "stem.1." + key[len("stem.bn.") :]
        elif key.startswith("head.fc."):
            new = "fc." + key[len("head.fc.") :]
        elif found := _PYCLS_BLOCK.match(key):
            stage, block, rest = int(found[1]), int(found[2]), found[3]
            part = next((p for p in _PYCLS_PARTS if rest.startswith(p)), None)
            if part is None:
                raise ValueError(f"checkpoint key {key!r} is not part of a pycls RegNet block")
            prefix = f"trunk_output.block{stage}.block{stage}-{block - 1}."
            new = prefix + _PYCLS_PARTS[part] + rest[len(part) :]
        else:
            raise ValueError(f"checkpoint key {key!r} is not part of a pycls RegNet")
        out[new] = value
    return out


def _adapt(
    model: nn.Module, state: dict[str, torch.Tensor], *, stride_in_1x1: bool | None = None
) -> dict[str, torch.Tensor]:
    if isinstance(model, RegNet) and any(k.startswith("stem.conv.") for k in state):
        state = pycls_regnet_to_torchvision(state)
    elif is_pytorchcv_layout(state):
        bottleneck = any(isinstance(m, Bottleneck) for m in model.modules())
        if isinstance(model, ResNet) and bottleneck and stride_in_1x1 is None:
            # pytorchcv's resnet50 and resnet50b have the same keys and shapes
            raise ValueError(
                "the checkpoint has pytorchcv's ResNet layout, which does not say where a "
                "bottleneck strides: set kwargs={'stride_in_1x1': True} for pytorchcv's "
                "resnet50/101/152 (the papers' teachers) or False for resnet50b/101b/152b"
            )
        state = pytorchcv_to_torchvision(model, state)
    absent = tuple(f"{h}." for h in AUX_HEADS if getattr(model, h, "") is None)
    if absent:
        state = {k: v for k, v in state.items() if not k.startswith(absent)}
    return state


@register("models")
def torchvision_model(
    *,
    name: str,
    num_classes: int = 1000,
    weights: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """A torchvision classifier (``resnet18``, ``mobilenet_v2``, ...), built without download.

    Args:
        name: model name as in ``torchvision.models.list_models(module=torchvision.models)``,
            or ``regnet_x_600mf`` / ``mnasnet2_0`` (see the module docstring).
        num_classes: classifier outputs.
        weights: ``None`` for a random init; a local checkpoint path (``.safetensors`` or a
            ``torch.save`` state dict, loaded with ``weights_only=True``; pycls-layout RegNet
            and pytorchcv-layout ResNet/MobileNetV2/InceptionV3 checkpoints are renamed); or
            ``"hub"`` for torchvision's default pretrained weights (downloads when online;
            needs ``num_classes=1000``).
        kwargs: further keyword arguments of the builder, e.g. ``{'transform_input': True,
            'aux_logits': False, 'init_weights': False}`` for ``inception_v3`` with torchvision's
            weights (an auxiliary head built away is skipped when loading), and dfqkit's
            :data:`OPTIONS` for pytorchcv's checkpoints: ``{'stride_in_1x1': True}`` (ResNet-50
            etc.: stride in the bottleneck's 1×1 conv, not the 3×3; required, True or False,
            with a pytorchcv-layout bottleneck ResNet checkpoint), ``{'first_expand_conv':
            True}`` (MobileNetV2: a 1×1 expansion conv in the first block).

    Returns:
        The model in eval mode.
    """
    models = classification_models()
    if name not in models:
        close = difflib.get_close_matches(name, models, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"name={name!r} is not a torchvision classification model "
            f"(see torchvision.models.list_models(module=torchvision.models)).{hint}"
        )
    if num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    extra = dict(kwargs or {})
    taken = sorted({"num_classes", "weights"} & set(extra))
    if taken:
        raise ValueError(f"kwargs={extra!r} sets {taken}: use the arguments of that name instead")
    options = {k: extra.pop(k) for k in OPTIONS if k in extra}
    for key, value in options.items():
        if not isinstance(value, bool):
            raise ValueError(f"kwargs[{key!r}] must be True or False, got {value!r}")
    hub = weights == HUB
    if hub and name in EXTRA_ARCHITECTURES:
        raise ValueError(
            f"weights='hub' with name={name!r}: torchvision publishes no weights for it; "
            "pass a local checkpoint (e.g. BRECQ's released one)"
        )
    if hub and any(options.values()):
        raise ValueError(
            f"kwargs={options!r} build pytorchcv's variant, which torchvision's weights "
            "(weights='hub') do not fit: pass pytorchcv's checkpoint as a local file"
        )
    try:
        if name in EXTRA_ARCHITECTURES:
            model = EXTRA_ARCHITECTURES[name](num_classes=num_classes, **extra)
        else:
            model = torchvision.models.get_model(
                name, weights="DEFAULT" if hub else None, num_classes=num_classes, **extra
            )
    except TypeError as err:
        raise ValueError(f"kwargs={extra!r} do not fit the builder of {name!r}: {err}") from err
    for key, value in options.items():
        if value:
            OPTIONS[key](model)
    if weights is not None and not hub:
        adapt = functools.partial(_adapt, stride_in_1x1=options.get("stride_in_1x1"))
        load_weights(model, weights, adapt=adapt)
    return model.eval()
