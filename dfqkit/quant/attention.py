"""Quantizing the two matmuls and the softmax input inside a ViT attention module.

The ``vit`` placement policy quantizes both operands of the attention's two matmuls
(``q·kᵀ`` and ``softmax·v``) and the attention logits before the softmax. Those tensors exist
only inside the attention's ``forward`` — and not at all on timm's fused path, where
``F.scaled_dot_product_attention`` does everything in one kernel. dfqkit intercepts them
without re-implementing any attention:

1. the module's fused path is switched off with timm's own per-module flag
   (``module.fused_attn = False``), so its forward runs the explicit
   ``q * scale → q @ kᵀ (+ bias, mask) → softmax → attn_drop → attn @ v`` path that timm keeps
   for every attention class (ViT/DeiT ``Attention``, Swin ``WindowAttention``, ...);
2. the module's class is swapped for a subclass whose ``forward`` runs the original one inside
   a :class:`~torch.overrides.TorchFunctionMode` that is active only during that call and
   rewrites exactly three calls: the first matmul (quantizes ``q`` and ``kᵀ``), the second
   matmul (quantizes the probabilities and ``v``) and the softmax (quantizes its input, the
   logits after any relative-position bias and mask).

The quantizers are children of the attention module (``q_quant``, ``k_quant``,
``logit_quant``, ``prob_quant``, ``v_quant``), so the float parameter names are unchanged. An
attention whose forward does not make exactly two matmuls and one softmax fails loudly instead
of being quantized silently wrong. The explicit path equals the fused one up to float
rounding (tested against timm's fused output).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

OPERAND_QUANTIZERS = ("q_quant", "k_quant", "logit_quant", "prob_quant", "v_quant")
_MATMULS = (torch.matmul, torch.Tensor.__matmul__, torch.Tensor.matmul)
_SOFTMAXES = (torch.softmax, torch.Tensor.softmax, F.softmax)


def is_attention(module: nn.Module) -> bool:
    """A timm-style self-attention: a ``qkv`` projection, ``num_heads`` and a ``fused_attn``
    switch (timm ``Attention``, ``WindowAttention`` and their relatives)."""
    return (
        hasattr(module, "qkv")
        and hasattr(module, "num_heads")
        and hasattr(module, "fused_attn")
        and not isinstance(module, QuantAttentionMixin)
    )


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The timm-style attention modules of ``model`` (quantized ones included), in module order."""
    return [
        m
        for m in model.modules()
        if hasattr(m, "qkv") and hasattr(m, "num_heads") and hasattr(m, "fused_attn")
    ]


class SecondMatmulRecorder(TorchFunctionMode):
    """Records the output of the second matmul (``attn @ v``) of one attention forward."""

    def __init__(self) -> None:
        super().__init__()
        self.matmuls = 0
        self.product: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        if func in _MATMULS:
            self.matmuls += 1
            if self.matmuls == 2:
                self.product = out
        return out


class _Operands(TorchFunctionMode):
    """Rewrites the two matmuls and the softmax of one attention forward."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.matmuls = 0
        self.softmaxes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        m = self.module
        if func in _MATMULS:
            a, b = args[0], args[1]
            if self.matmuls == 0:
                a, b = m.q_quant(a), m.k_quant(b)
            elif self.matmuls == 1:
                a, b = m.prob_quant(a), m.v_quant(b)
            else:
                raise RuntimeError(_unexpected(m, "more than two matmuls"))
            self.matmuls += 1
            args = (a, b, *args[2:])
        elif func in _SOFTMAXES:
            if self.softmaxes:
                raise RuntimeError(_unexpected(m, "more than one softmax"))
            self.softmaxes += 1
            args = (m.logit_quant(args[0]), *args[1:])
        return func(*args, **kwargs)


def _unexpected(module: nn.Module, what: str) -> str:
    return (
        f"{type(module).__name__}: its unfused attention path makes {what}; the vit policy "
        "expects q @ kᵀ → softmax → attn @ v"
    )


class QuantAttentionMixin:
    """Mixed into the class of a converted attention module (see the module docstring)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        mode = _Operands(self)
        with mode:
            out = super().forward(*args, **kwargs)
        if mode.matmuls != 2 or mode.softmaxes != 1:
            raise RuntimeError(
                _unexpected(self, f"{mode.matmuls} matmul(s) and {mode.softmaxes} softmax(es)")
            )
        return out


_CLASSES: dict[type, type] = {}


def quantize_attention_(module: nn.Module, make_quantizer: Callable[[], nn.Module]) -> None:
    """Convert one attention module in place: unfused path, five operand quantizers."""
    if not is_attention(module):
        raise ValueError(f"{type(module).__name__} is not a timm-style attention module")
    cls = type(module)
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Quant{cls.__name__}", (QuantAttentionMixin, cls), {})
    module.fused_attn = False
    for name in OPERAND_QUANTIZERS:
        module.add_module(name, make_quantizer())
    module.__class__ = _CLASSES[cls]
