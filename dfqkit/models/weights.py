"""Loading local checkpoints (safetensors or plain state dicts) into a model."""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfqkit.models.order_keys import map_by_order

logger = logging.getLogger(__name__)

# Keys under which training scripts commonly nest the weights, tried in this order.
NESTING_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model", "net", "module")
# Prefixes added by DistributedDataParallel / DataParallel and torch.compile.
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
SHOWN = 5  # keys listed per kind of mismatch in an error
KEY_MAPS: tuple[str, ...] = ("name", "order")  # how checkpoint keys meet the model's


def safe_torch_load(path: str | os.PathLike[str], *, what: str = "file", hint: str = "") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with one-line errors.

    Raises:
        ValueError: the file holds pickled objects beyond tensors and plain containers (a
            pickle that would import and call something: refused, never executed), or it is
            corrupt or truncated. The message names the file; ``hint`` is appended.
    """
    from accelerate.utils.other import TORCH_SAFE_GLOBALS  # numpy RNG states of checkpoints

    try:
        with torch.serialization.safe_globals(list(TORCH_SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError/RuntimeError by version
        text = str(err)
        if "Unsupported global" in text or "unsupported GLOBAL" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            ref = f" ({found.group(1)})" if found else ""
            raise ValueError(
                f"{what} {str(path)!r} holds pickled objects other than tensors and plain "
                f"values{ref}: refused, since loading it could run code{hint}"
            ) from err
        if "WeightsUnpickler error:" in text:
            text = text.split("WeightsUnpickler error:", 1)[1]
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        first = lines[0].split(". ")[0] if lines else type(err).__name__
        raise ValueError(f"{what} {str(path)!r} is corrupt or truncated ({first}){hint}") from err


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint file, unwrapping common nesting and wrapper prefixes.

    ``.safetensors`` files are read with ``safetensors.torch.load_file``; anything else with
    ``torch.load(..., weights_only=True)``, which refuses pickled code.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds no state dict.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path), device="cpu")
    else:
        obj = safe_torch_load(
            path,
            what="checkpoint",
            hint="; re-save it with torch.save(model.state_dict(), path) or as .safetensors",
        )
    # A state dict maps names to tensors, so a nesting key holding a mapping is a wrapper
    # (``{"epoch": 3, "model": {...}, "best_acc1": tensor}``).
    while isinstance(obj, Mapping):
        nested = next((obj[k] for k in NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    metadata = getattr(obj, "_metadata", None)  # per-module versions that torch.save kept
    if not state:
        raise ValueError(
            f"checkpoint {str(path)!r} holds no tensors (top-level keys: {list(obj)[:SHOWN]})"
        )
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
            if metadata is not None:
                metadata = {k[len(prefix) :] if k.startswith(prefix) else k: v
                            for k, v in metadata.items()}  # fmt: skip
    out = OrderedDict(state)
    if metadata is not None:
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def _listing(label: str, items: list[str]) -> str:
    more = f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return f"{len(items)} {label} ({', '.join(items[:SHOWN])}{more})"


def load_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    strict: bool = True,
    adapt: Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    key_map: str = "name",
) -> nn.Module:
    """Load the checkpoint at ``path`` into ``model`` (in place) and return ``model``.

    Args:
        model: the module to fill.
        path: ``.safetensors`` file, or a ``torch.save`` file of a state dict, possibly nested
            under ``state_dict``/``model``/... and with ``module.`` prefixes.
        strict: require every key of the model and nothing else (``num_batches_tracked`` of
            BN layers may be absent). Shapes must match either way.
        adapt: ``adapt(model, state) -> state``, applied before matching: renames keys of
            another code base's layout (pycls RegNets) or drops heads the model was built
            without (Inception's auxiliary classifier).
        key_map: ``"name"`` matches keys by name; ``"order"`` first pairs the checkpoint's
            tensors with the model's ``state_dict()`` by position, checking counts, shapes and
            names (:func:`dfqkit.models.order_keys.map_by_order`; ``num_batches_tracked`` keeps
            the model's value), for files of another code base saved in the same order. Not
            for ``.safetensors`` files, which do not keep the order.

    A checkpoint without per-module version metadata (every ``.safetensors`` file) is loaded
    as the model's current version, which modules such as torchvision's ``MNASNet`` require.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the checkpoint does not fit the model (a few offending keys are listed);
            ``key_map`` is unknown, or ``"order"`` with a ``.safetensors`` file.
    """
    if key_map not in KEY_MAPS:
        raise ValueError(f"key_map={key_map!r} is not one of {KEY_MAPS}")
    if key_map == "order" and Path(path).suffix == ".safetensors":
        raise ValueError(
            f"key_map='order' with {str(path)!r}: a .safetensors file sorts its tensors by dtype "
            "and name, so their saving order is lost; pass the torch.save file instead"
        )
    state = read_state_dict(path)
    expected = model.state_dict()
    # the checkpoint's module versions; the model's own when it has none or keys were renamed
    metadata = getattr(state, "_metadata", None)
    if key_map == "order":  # the versions name the other code base's modules
        try:
            state, metadata = map_by_order(model, state), None
        except ValueError as err:
            raise ValueError(f"checkpoint {str(path)!r}: {err}") from err
    if adapt is not None:
        adapted = adapt(model, state)
        if not adapted.keys() <= state.keys():  # renamed: the versions name other modules
            metadata = None
        state = adapted
    if metadata is None:
        metadata = getattr(expected, "_metadata", None)
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = [
        _listing(label, items)
        for label, items, fatal in (
            ("missing keys", missing, strict),
            ("unexpected keys", unexpected, strict),
            ("shape mismatches", mismatched, True),
        )
        if items and fatal
    ]
    if problems:
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit model {type(model).__name__}: "
            + "; ".join(problems)
        )
    if missing or unexpected:
        logger.warning(
            "loading %s non-strictly: %d missing, %d unexpected keys",
            path,
            len(missing),
            len(unexpected),
        )
    state = OrderedDict(state)
    if metadata is not None:
        state._metadata = metadata  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=False)
    return model
