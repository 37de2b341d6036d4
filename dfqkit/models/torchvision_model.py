"""Any torchvision classification model by name, with local weights.

Beside torchvision's own names, two architectures the PTQ papers report that torchvision has no
builder for are built from torchvision's classes: ``regnet_x_600mf`` (pycls RegNetX-600MF, as in
BRECQ and Genie) and ``mnasnet2_0`` (MnasNet with depth multiplier 2.0, as in BRECQ and Genie).
Checkpoints in pycls's RegNet layout (BRECQ's ``regnet_600m.pth.tar``, ``regnet_3200m.pth.tar``)
are renamed to torchvision's layout on load; BRECQ's MnasNet-2.0 checkpoint already has
torchvision's layout.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.mnasnet import MNASNet
from torchvision.models.regnet import BlockParams, RegNet

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


def _adapt(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(model, RegNet) and any(k.startswith("stem.conv.") for k in state):
        state = pycls_regnet_to_torchvision(state)
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
            checkpoints are renamed); or ``"hub"`` for torchvision's default pretrained weights
            (downloads when online; needs ``num_classes=1000``).
        kwargs: further keyword arguments of the builder, e.g. ``{'transform_input': True,
            'aux_logits': False, 'init_weights': False}`` for ``inception_v3`` with torchvision's
            weights (an auxiliary head built away is skipped when loading).

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
    hub = weights == HUB
    if hub and name in EXTRA_ARCHITECTURES:
        raise ValueError(
            f"weights='hub' with name={name!r}: torchvision publishes no weights for it; "
            "pass a local checkpoint (e.g. BRECQ's released one)"
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
    if weights is not None and not hub:
        load_weights(model, weights, adapt=_adapt)
    return model.eval()
