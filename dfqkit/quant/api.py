"""The quantization verbs: ``quantize_`` a model, then drive its activation quantizers."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dfqkit.quant.act_base import ActQuantizer, check_mode
from dfqkit.quant.config import QuantConfig
from dfqkit.quant.dry_run import DryRun, dry_run
from dfqkit.quant.modules import QUANT_MODULES, QuantConv2d, QuantLinear, quant_class
from dfqkit.quant.policies import POLICIES

FilterFn = Callable[[nn.Module, str], bool]
logger = logging.getLogger(__name__)


def _swap_layers(
    model: nn.Module, config: QuantConfig, run: DryRun, filter_fn: FilterFn | None
) -> nn.Module:
    first = run.layer_order[0] if run.layer_order else None
    last = run.layer_order[-1] if run.layer_order else None
    swapped: dict[int, nn.Module] = {}  # by layer object: a shared layer stays shared
    unknown: list[str] = []
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) not in swapped:
            if not isinstance(module, tuple(QUANT_MODULES)):
                continue
            if filter_fn is not None and not filter_fn(module, name):
                continue
            quant_cls = quant_class(module)
            if quant_cls is None:
                unknown.append(f"{name} ({type(module).__name__})")
                continue
            bits = config.weight_bits(first=name == first, last=name == last, name=name)
            swapped[id(module)] = quant_cls.from_float(
                module, weight_quant=config.weight_quantizer(bits=bits), input_quant=None
            )
        if not name:
            return swapped[id(module)]  # the model is a single layer
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, swapped[id(module)])
    if config.layer_bits:
        quantized = {
            n for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))
        }
        missing = sorted(set(config.layer_bits) - quantized)
        if missing:
            hints = [
                difflib.get_close_matches(n, sorted(quantized), n=1, cutoff=0.6) for n in missing
            ]
            said = ", ".join(
                repr(n) + (f" (did you mean {h[0]!r}?)" if h else "")
                for n, h in zip(missing, hints, strict=True)
            )
            raise ValueError(
                f"layer_bits names no quantized conv/linear layer of {type(model).__name__}: "
                f"{said}; its layers are named like {sorted(quantized)[:3]}"
            )
    if unknown:
        logger.warning(
            f"{len(unknown)} of {len(unknown) + len(swapped)} convolution/linear layers stay in "
            f"float: their class overrides forward and dfqkit has no quantized version of it "
            f"({', '.join(unknown[:8])}{', ...' if len(unknown) > 8 else ''}); register one in "
            "dfqkit.quant.modules.QUANT_MODULES, or pass a filter_fn that excludes them to "
            "silence this"
        )
    return model


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    example_inputs: Tensor | Sequence[Any],
    filter_fn: FilterFn | None = None,
) -> nn.Module:
    """Quantize ``model`` in place: fake-quantized conv/linear weights plus activation quantizers.

    Every ``nn.Conv2d``/``nn.Linear`` (subclasses too, unless they override ``forward``) becomes
    a :class:`QuantConv2d`/:class:`QuantLinear` (timm's ``Conv2dSame`` a
    :class:`QuantConv2dSame`; any other subclass that overrides ``forward`` stays float, with a
    warning naming it) sharing the float layer's parameters, with a
    weight quantizer from ``config.weight_quantizer``; the first and last layers in execution
    order get ``first_layer_bits``/``last_layer_bits``. Then ``config.policy`` places the
    activation quantizers (in ``"observe"`` mode). One forward on ``example_inputs`` in eval
    mode without gradients (BatchNorm statistics untouched) finds the execution order and the
    ReLU call sites.

    Always use the returned model: the ``after_relu`` policy returns a new
    ``torch.fx.GraphModule`` (same parameter and module names) when a ReLU module is reused or a
    functional ReLU is called. No tensor is modified, so a teacher stays untouched when the
    student is ``quantize_(copy.deepcopy(teacher), ...)``.

    Args:
        model: The float model, changed in place.
        config: What to build.
        example_inputs: A batch ``(b, c, h, w)`` or a tuple of positional inputs.
        filter_fn: ``filter_fn(module, fqn) -> bool``; layers for which it returns False stay
            float (they still count as first/last layers of the network).

    Returns:
        The quantized model.

    Raises:
        ValueError: ``config`` is no QuantConfig, ``model`` is already quantized, or the policy
            placed no quantizer.
        RuntimeError: The fx rewrite was needed and tracing failed.
    """
    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a QuantConfig, got {type(config).__name__}")
    if any(isinstance(m, (QuantConv2d, QuantLinear, ActQuantizer)) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} is already quantized; quantize a float model")
    inputs = (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    run = dry_run(model, inputs, config.relu_types)
    model = _swap_layers(model, config, run, filter_fn)
    return POLICIES[config.policy](model, config, run)


def float_layers(model: nn.Module) -> list[str]:
    """``"name (Class)"`` of every convolution and linear layer of a quantized ``model`` that
    computes in float (a ``filter_fn`` excluded it, or its class overrides ``forward`` and has
    no quantized version), in module order; empty when every one is quantized."""
    quantized = (QuantConv2d, QuantLinear)
    return [
        f"{name} ({type(m).__name__})"
        for name, m in model.named_modules()
        if isinstance(m, tuple(QUANT_MODULES)) and not isinstance(m, quantized)
    ]


def act_quantizers(model: nn.Module) -> list[ActQuantizer]:
    """Every activation quantizer of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def set_quant_mode(model: nn.Module, mode: str) -> None:
    """Set every activation quantizer to ``"observe"`` (update ranges) or ``"frozen"``."""
    check_mode(mode)
    for quantizer in act_quantizers(model):
        quantizer.mode = mode


def sync_quantizers(model: nn.Module) -> None:
    """All-reduce every activation quantizer's range across processes (no-op when single)."""
    for quantizer in act_quantizers(model):
        quantizer.sync_()


def clip_bounds(model: nn.Module) -> dict[str, list[float]]:
    """The learned clip range ``[lo, hi]`` of every activation quantizer whose range is a
    parameter (``param_group``: learnable clips), in module order: ``{"lo": [...], "hi":
    [...]}``, empty when there is none (one host read)."""
    learned = [q for q in act_quantizers(model) if getattr(q, "param_group", None)]
    if not learned:
        return {}
    values = torch.stack([torch.stack([q.lo.detach(), q.hi.detach()]) for q in learned])
    lo, hi = values.float().cpu().T.tolist()
    return {"lo": lo, "hi": hi}
