"""Any timm model by name, with local weights."""

from __future__ import annotations

import difflib

import timm
from torch import nn

from dfqkit.models.weights import load_weights
from dfqkit.registry import register

HUB = "hub"


@register("models")
def timm_model(
    *, name: str, num_classes: int | None = None, weights: str | None = None
) -> nn.Module:
    """A timm model (``deit_tiny_patch16_224``, ``resnet18``, ...), built without download.

    Args:
        name: timm model name, optionally with a pretrained tag (``resnet18.a1_in1k``).
        num_classes: classifier outputs; ``None`` keeps the model's default (1000 mostly).
        weights: ``None`` for a random init; a local checkpoint path (``.safetensors`` or a
            ``torch.save`` state dict, loaded with ``weights_only=True``); or ``"hub"`` for
            timm's pretrained weights (downloads from the Hugging Face hub when online).

    Returns:
        The model in eval mode.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"name={name!r} is not a timm model (see timm.list_models()).{hint}")
    if num_classes is not None and num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    hub = weights == HUB
    model = timm.create_model(name, pretrained=hub, **kwargs)
    if weights is not None and not hub:
        load_weights(model, weights)
    return model.eval()
