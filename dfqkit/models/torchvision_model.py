"""Any torchvision classification model by name, with local weights."""

from __future__ import annotations

import difflib

import torchvision
from torch import nn

from dfqkit.models.weights import load_weights
from dfqkit.registry import register

HUB = "hub"


def classification_models() -> list[str]:
    """Names of torchvision's image-classification models."""
    return torchvision.models.list_models(module=torchvision.models)


@register("models")
def torchvision_model(
    *, name: str, num_classes: int = 1000, weights: str | None = None
) -> nn.Module:
    """A torchvision classifier (``resnet18``, ``mobilenet_v2``, ...), built without download.

    Args:
        name: model name as in ``torchvision.models.list_models(module=torchvision.models)``.
        num_classes: classifier outputs.
        weights: ``None`` for a random init; a local checkpoint path (``.safetensors`` or a
            ``torch.save`` state dict, loaded with ``weights_only=True``); or ``"hub"`` for
            torchvision's default pretrained weights (downloads when online; needs
            ``num_classes=1000``).

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
    hub = weights == HUB
    model = torchvision.models.get_model(
        name, weights="DEFAULT" if hub else None, num_classes=num_classes
    )
    if weights is not None and not hub:
        load_weights(model, weights)
    return model.eval()
