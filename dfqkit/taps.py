"""Forward hooks that capture the tensors losses read, installed only for declared needs.

A :class:`Taps` object is built once per model with the set of tap names some loss declared;
it installs hooks only for those, and only records while :attr:`Taps.enabled` (the trainer
turns it on around the forwards whose losses read taps, so evaluation forwards record nothing).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish)


def bn_layers(model: nn.Module) -> list[nn.Module]:
    """The model's batch-norm layers that hold running statistics."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]


class Taps:
    """Hooks on ``model`` recording the tensors named in ``needs``.

    Supported taps:
        ``bn_inputs``: ``(input, bn_module)`` pairs for every BatchNorm layer with running stats.
        ``activations``: outputs of every activation module (ReLU, ReLU6, GELU, SiLU, Hardswish).

    Raises:
        ValueError: ``bn_inputs`` requested on a model without BatchNorm (e.g. a ViT), or an
            unknown tap name.
    """

    SUPPORTED = ("bn_inputs", "activations")

    def __init__(self, model: nn.Module, needs: Iterable[str], *, model_name: str = "model"):
        self.needs = frozenset(needs)
        unknown = self.needs - set(self.SUPPORTED)
        if unknown:
            raise ValueError(
                f"unknown tap(s) {sorted(unknown)} for {model_name}; supported: {self.SUPPORTED}"
            )
        self.enabled = False
        self.store: dict[str, list[Any]] = {name: [] for name in self.needs}
        self._handles: list[Any] = []
        if "bn_inputs" in self.needs:
            bns = bn_layers(model)
            if not bns:
                raise ValueError(
                    f"a loss needs batch-norm statistics but {model_name} "
                    f"({type(model).__name__}) has no BatchNorm layer with running statistics; "
                    "BN-free teachers such as ViTs cannot use BNStatsLoss: remove it from "
                    "train.losses"
                )
            for bn in bns:
                self._handles.append(bn.register_forward_pre_hook(self._bn_input))
        if "activations" in self.needs:
            for m in model.modules():
                if isinstance(m, ACTIVATION_TYPES):
                    self._handles.append(m.register_forward_hook(self._activation))

    def _bn_input(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if self.enabled:
            self.store["bn_inputs"].append((args[0], module))

    def _activation(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self.enabled:
            self.store["activations"].append(output)

    def collect(self) -> dict[str, list[Any]]:
        """Return what was recorded since the last call and start afresh."""
        out = self.store
        self.store = {name: [] for name in self.needs}
        return out

    def __enter__(self) -> Taps:
        self.enabled = True
        self.store = {name: [] for name in self.needs}
        return self

    def __exit__(self, *exc: Any) -> None:
        self.enabled = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
