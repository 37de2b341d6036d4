"""One forward of the float model that records what placement decisions need."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

_RELU_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {F.relu, F.relu_, F.relu6, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}
)
_HARDTANH_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset({F.hardtanh, F.hardtanh_})
_RELU_METHODS: frozenset[str] = frozenset({"relu", "relu_"})


def is_relu_call(target: Callable[..., Any] | str, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether a function (or Tensor method name) call computes a ReLU or ReLU6.

    ``F.hardtanh`` counts when its lower bound is 0 (``nn.ReLU6`` and ``F.relu6`` call it that
    way); other clamps do not.
    """
    if isinstance(target, str):
        return target in _RELU_METHODS
    try:
        if target in _RELU_FUNCTIONS:
            return True
        if target in _HARDTANH_FUNCTIONS:
            return (args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)) == 0
    except TypeError:  # an unhashable callable is no ReLU
        pass
    return False


@dataclass
class DryRun:
    """What one forward of the float model showed.

    Attributes:
        layer_order: Qualified names of ``nn.Conv2d``/``nn.Linear`` modules in order of first
            call (modules never called are absent).
        relu_calls: Calls per ReLU module (of the configured types), by qualified name.
        functional_relus: ReLU function calls made outside ReLU modules (``F.relu``, ...).
    """

    layer_order: list[str] = field(default_factory=list)
    relu_calls: Counter[str] = field(default_factory=Counter)
    functional_relus: int = 0

    @property
    def relu_sites(self) -> int:
        """Every ReLU call, module or functional."""
        return sum(self.relu_calls.values()) + self.functional_relus


class _FunctionalReluCounter(TorchFunctionMode):
    def __init__(self, run: DryRun, depth: list[int]) -> None:
        super().__init__()
        self.run = run
        self.depth = depth  # > 0 while inside a ReLU module, whose own F.relu does not count

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if self.depth[0] == 0 and is_relu_call(func, args, kwargs):
            self.run.functional_relus += 1
        return func(*args, **kwargs)


def dry_run(
    model: nn.Module, example_inputs: tuple[Any, ...], relu_types: tuple[type[nn.Module], ...]
) -> DryRun:
    """Run ``model(*example_inputs)`` once in eval mode, without gradients, and record calls.

    The model's train/eval flags are restored afterwards and nothing else changes (eval mode
    keeps BatchNorm running statistics untouched).

    Args:
        model: The float model.
        example_inputs: Positional inputs, e.g. ``(images,)`` with images ``(b, c, h, w)``.
        relu_types: Module types that count as a ReLU.

    Returns:
        The recorded :class:`DryRun`.
    """
    run = DryRun()
    depth = [0]
    seen: set[str] = set()

    def on_layer(name: str) -> None:
        if name not in seen:
            seen.add(name)
            run.layer_order.append(name)

    def enter_relu(name: str) -> None:
        run.relu_calls[name] += 1
        depth[0] += 1

    def leave_relu() -> None:
        depth[0] -= 1

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: on_layer(n)))
        if isinstance(module, relu_types):
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: enter_relu(n)))
            handles.append(module.register_forward_hook(lambda m, a, o: leave_relu()))
    flags = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), _FunctionalReluCounter(run, depth):
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags.items():
            module.training = training
    return run
