"""Split a network into ``J`` consecutive parts without changing it.

The paper's multi-level class embeddings (and SimLoss_1) read a teacher's features at ``J`` cut
points, "split evenly into J consecutive parts" (supplement, Fig. 3). dfqkit finds the model's
*blocks* — the units a network is a chain of — and cuts after every ``N / J``-th one:

* transformer models (timm ViT / DeiT / Swin): the encoder blocks, in order (``blocks`` of a
  ViT, the blocks inside every stage of a Swin);
* CNNs: the children of ``nn.Sequential`` containers that contain a convolution, are not a
  bare convolution and not a plain ``nn.Sequential`` (a residual unit of a CIFAR ResNet-20, a
  ``BasicBlock`` / ``Bottleneck`` of a torchvision ResNet, an ``InvertedResidual`` of
  MobileNetV2, the blocks of timm's EfficientNet / ResNet stages). A block inside another block
  is not counted again, and a leading stem whose type differs from the most common block type
  (the CIFAR ResNet ``init_block``, MobileNetV2's first conv) is not a block: it belongs to the
  first part.
* plain CNNs with neither (convolutions held directly as attributes, e.g. three convolutions
  and two linear layers): every convolution is a unit, so the cuts fall on convolution outputs.

Blocks are ordered by execution (one forward on an example input), so containers defined out of
order still split correctly. The features of part ``j`` are the output of its last block; pool
them with :func:`pool_features` (global average pool for ``(b, c, h, w)``, the token mean for
``(b, n, d)``, and ``(b, h, w, c)`` Swin maps are averaged over ``h, w``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, _CONV) for m in module.modules())


def _transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks) > 0:
        if not any(isinstance(m, _CONV) for b in blocks for m in b.modules()):
            return [(f"blocks.{i}", b) for i, b in enumerate(blocks)]
    layers = getattr(model, "layers", None)  # timm Swin: layers[i].blocks[j]
    if isinstance(layers, nn.Sequential | nn.ModuleList):
        out = []
        for i, stage in enumerate(layers):
            inner = getattr(stage, "blocks", None)
            if not isinstance(inner, nn.Sequential | nn.ModuleList):
                return None
            out += [(f"layers.{i}.blocks.{j}", b) for j, b in enumerate(inner)]
        return out or None
    return None


def _cnn_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    candidates: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        for child_name, child in module.named_children():
            if type(child) is nn.Sequential or isinstance(child, _CONV) or not _has_conv(child):
                continue
            candidates.append((f"{name}.{child_name}" if name else child_name, child))
    names = [n for n, _ in candidates]
    blocks = [
        (n, m) for n, m in candidates if not any(n.startswith(o + ".") for o in names if o != n)
    ]
    # a stem (CIFAR ResNet init_block, MobileNetV2 features.0) is not one of the repeated
    # units: drop leading blocks whose type differs from the most common block type
    if blocks:
        types = [type(m) for _, m in blocks]
        common = max(set(types), key=types.count)
        while len(blocks) > 1 and type(blocks[0][1]) is not common:
            blocks.pop(0)
    return blocks


def find_blocks(model: nn.Module, example: torch.Tensor | None = None) -> list[str]:
    """Qualified names of the model's blocks in execution order.

    Args:
        model: a classifier.
        example: an input batch ``(b, c, h, w)`` used to order the blocks by execution; without
            it, definition order is used.

    Raises:
        ValueError: the model has no recognisable chain of blocks.
    """
    found = _transformer_blocks(model)
    if found is None:
        found = _cnn_blocks(model)
    if not found:  # a plain CNN (convolutions as direct attributes): each one is a unit
        found = [(n, m) for n, m in model.named_modules() if isinstance(m, _CONV)]
    if not found:
        raise ValueError(
            f"cannot split {type(model).__name__} into parts: no chain of blocks found (looked "
            "for transformer `blocks`/`layers[i].blocks`, for conv-bearing children of "
            "nn.Sequential containers and for convolutions)"
        )
    if example is not None:
        order: dict[int, int] = {}

        def record(module: nn.Module, _args: object, _out: object) -> None:
            order.setdefault(id(module), len(order))

        handles = [m.register_forward_hook(record) for _, m in found]
        try:
            with torch.no_grad():
                model(example)
        finally:
            for h in handles:
                h.remove()
        found = sorted(
            (item for item in found if id(item[1]) in order), key=lambda it: order[id(it[1])]
        )
    return [n for n, _ in found]


def cut_indices(num_blocks: int, parts: int) -> list[int]:
    """Indices of the last block of each of ``parts`` even parts of ``num_blocks`` blocks.

    ``cut_indices(9, 3) == [2, 5, 8]``; uneven counts round to the nearest block
    (``cut_indices(8, 3) == [2, 4, 7]``); the last part always ends at the last block.
    """
    if not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts must be an integer >= 1, got {parts!r}")
    if parts > num_blocks:
        raise ValueError(f"cannot split {num_blocks} blocks into {parts} parts")
    return [round((j + 1) * num_blocks / parts) - 1 for j in range(parts)]


def split_points(model: nn.Module, parts: int, example: torch.Tensor | None = None) -> list[str]:
    """Names of the ``parts`` modules whose outputs end the ``parts`` consecutive parts."""
    blocks = find_blocks(model, example)
    return [blocks[i] for i in cut_indices(len(blocks), parts)]


def pool_features(x: torch.Tensor, *, channels_last: bool = False) -> torch.Tensor:
    """``(b, c, h, w)`` → GAP ``(b, c)``; ``(b, n, d)`` → token mean ``(b, d)``;
    with ``channels_last`` a ``(b, h, w, c)`` map (timm Swin) → ``(b, c)``; ``(b, d)`` unchanged."""
    if isinstance(x, tuple):
        x = x[0]
    if x.dim() == 2:
        return x
    if x.dim() == 3:
        return x.mean(1)
    if x.dim() == 4:
        return x.mean((1, 2)) if channels_last else x.mean((2, 3))
    raise ValueError(f"cannot pool a feature of shape {tuple(x.shape)}")


def is_channels_last(block_names: Sequence[str]) -> bool:
    """Blocks of a timm Swin (``layers.i.blocks.j``) output ``(b, h, w, c)`` maps."""
    return bool(block_names) and block_names[0].startswith("layers.")


def feature_dims(model: nn.Module, names: Sequence[str], example: torch.Tensor) -> list[int]:
    """Pooled feature width at each named module, from one forward on ``example``."""
    modules = dict(model.named_modules())
    channels_last = is_channels_last(names)
    out: dict[str, int] = {}
    handles = []
    for n in names:

        def hook(_m, _i, o, n=n):
            out[n] = pool_features(o, channels_last=channels_last).shape[-1]

        handles.append(modules[n].register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return [out[n] for n in names]
