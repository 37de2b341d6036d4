"""Data-free transforms around ``quantize_``: what ``train.transforms`` holds.

A transform acts on the model being quantized without any data, in two places:

* ``before(model, example) -> state`` on the float copy, before ``quantize_`` (cross-layer
  equalization changes weights there; bias correction reads the graph there);
* ``after(student, state)`` on the quantized model (bias correction adds ``-(W_q - W)·E[x]``).

:func:`quantize_with` runs every ``before`` in list order, ``quantize_``, then every ``after``.
The run builds the student *and* the naive reference with it, so both see the same transforms;
with no transform it is exactly ``quantize_``. Transforms whose ``stage`` is ``"float"``
(they change the float model) come first, then ``"rounding"`` ones (they change how the
quantized weights are rounded, e.g. SQuant), then ``"quantized"`` ones (they read the float
model to correct the quantized one, e.g. bias correction); another order is refused.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from dfqkit.errors import ConfigError
from dfqkit.quant import QuantConfig, quantize_
from dfqkit.quant.act_base import ActQuantizer
from dfqkit.quant.modules import QuantConv2d, QuantLinear

#: the order transforms run in: on the float model, then on the rounding of the quantized
#: weights (SQuant), then reading the quantized model (bias correction)
STAGES = ("float", "rounding", "quantized")


class Transform:
    """Base class: a data-free step before and/or after quantization (``stage`` orders them)."""

    stage: str = "float"

    def before(self, model: nn.Module, example: Tensor | None) -> Any:
        """Act on (or read) the float ``model`` in place; the return value goes to ``after``."""
        return None

    def after(self, student: nn.Module, state: Any) -> None:
        """Act on the quantized ``student`` in place."""


def check_float(transform: Transform, model: nn.Module) -> None:
    """A model that is already quantized is refused, naming the transform."""
    if any(isinstance(m, QuantConv2d | QuantLinear | ActQuantizer) for m in model.modules()):
        raise ConfigError(
            f"train.transforms: {transform!r} needs the float model, got a quantized "
            f"{type(model).__name__}"
        )


def check_transforms(transforms: Sequence[Any]) -> list[Transform]:
    """``train.transforms`` as a list, each a :class:`Transform` instance, float stages first."""
    if isinstance(transforms, str | Transform) or not isinstance(transforms, Sequence):
        raise ConfigError(
            f"train.transforms must be a list of transforms (e.g. "
            f"[@ptq.CrossLayerEqualization(), @ptq.BiasCorrection()]), got {transforms!r}"
        )
    for i, t in enumerate(transforms):
        if inspect.isclass(t) and issubclass(t, Transform):
            raise ConfigError(
                f"train.transforms[{i}] is @ptq.{t.__name__} — the class itself, not an "
                f"instance: write @ptq.{t.__name__}() (with parentheses) so gin builds one"
            )
        if not isinstance(t, Transform):
            raise ConfigError(
                f"train.transforms[{i}] must be a data-free transform (@ptq.CrossLayerEqualization"
                f"(), @ptq.SQuant(), @ptq.BiasCorrection()), got {t!r}"
            )
    stages = [STAGES.index(t.stage) for t in transforms]
    if stages != sorted(stages):
        order = ", ".join(f"{t!r} ({t.stage})" for t in transforms)
        raise ConfigError(
            f"train.transforms = [{order}]: the stages must run in the order {STAGES} "
            "(bias correction reads the equalized model and corrects the final rounding)"
        )
    return list(transforms)


def quantize_with(
    model: nn.Module,
    config: QuantConfig,
    example: Tensor,
    transforms: Sequence[Transform] = (),
) -> nn.Module:
    """``quantize_(model, config, example)`` with ``transforms`` around it (``model`` changes in
    place; always use the returned model). Without transforms this is ``quantize_`` itself."""
    if not transforms:
        return quantize_(model, config, example)
    states = [t.before(model, example) for t in transforms]
    student = quantize_(model, config, example)
    for t, state in zip(transforms, states, strict=True):
        t.after(student, state)
    return student
