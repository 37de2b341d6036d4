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
        relu_owners: Qualified names of the modules whose forward (directly or through a
            submodule) made such a function call ("" = the root).
        stem_relus: ReLU modules first called after the first conv/linear and before the
            second (in a CNN: the stem's activation, whose output the second layer reads).
    """

    layer_order: list[str] = field(default_factory=list)
    relu_calls: Counter[str] = field(default_factory=Counter)
    functional_relus: int = 0
    relu_owners: set[str] = field(default_factory=set)
    stem_relus: set[str] = field(default_factory=set)

    @property
    def relu_sites(self) -> int:
        """Every ReLU call, module or functional."""
        return sum(self.relu_calls.values()) + self.functional_relus


class _Recorder(TorchFunctionMode):
    """Counts functional ReLUs, keeping the stack of modules whose forward is running."""

    def __init__(self, run: DryRun, relu_types: tuple[type[nn.Module], ...]) -> None:
        super().__init__()
        self.run = run
        self.relu_types = relu_types
        self.stack: list[str] = [""]
        self.seen: set[str] = set()
        self.relu_depth = 0  # > 0 inside a ReLU module, whose own F.relu call does not count

    def enter(self, module: nn.Module, name: str) -> None:
        self.stack.append(name)
        if isinstance(module, self.relu_types):
            if name not in self.run.relu_calls and len(self.run.layer_order) == 1:
                self.run.stem_relus.add(name)
            self.run.relu_calls[name] += 1
            self.relu_depth += 1
        if isinstance(module, (nn.Conv2d, nn.Linear)) and name not in self.seen:
            self.seen.add(name)
            self.run.layer_order.append(name)

    def leave(self, module: nn.Module) -> None:
        self.stack.pop()
        if isinstance(module, self.relu_types):
            self.relu_depth -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if self.relu_depth == 0 and is_relu_call(func, args, kwargs):
            self.run.functional_relus += 1
            self.run.relu_owners.update(self.stack)
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
    recorder = _Recorder(run, relu_types)
    handles = []
    for name, module in model.named_modules():
        if name:
            pre = module.register_forward_pre_hook(lambda m, a, n=name: recorder.enter(m, n))
            post = module.register_forward_hook(lambda m, a, o: recorder.leave(m))
            handles += [pre, post]
    flags = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad(), recorder:
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags.items():
            module.training = training
    return run
