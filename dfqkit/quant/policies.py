"""Activation-quantizer placement policies, by name (``QuantConfig.policy``).

A policy is ``policy(model, config, run) -> model``: it adds activation quantizers to a model
whose conv/linear layers are already swapped, given the :class:`DryRun` of the float model,
and returns the model to use (possibly a new ``torch.fx.GraphModule``). Add one by writing the
function and an entry in :data:`POLICIES` (``vit`` goes here).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch.fx as fx
from torch import nn

from dfqkit.quant.act_base import ActQuantizer
from dfqkit.quant.attention import is_attention, quantize_attention_
from dfqkit.quant.dry_run import DryRun, is_relu_call
from dfqkit.quant.fx_rewrite import insert_after, trace
from dfqkit.quant.modules import QuantConv2d, QuantLinear

if TYPE_CHECKING:
    from dfqkit.quant.config import QuantConfig

Policy = Callable[[nn.Module, "QuantConfig", DryRun], nn.Module]


def _none_placed(model: nn.Module, policy: str, why: str) -> ValueError:
    return ValueError(
        f"policy {policy!r} placed no activation quantizer in {type(model).__name__}: {why}"
    )


def layer_inputs(model: nn.Module, config: QuantConfig, run: DryRun) -> nn.Module:
    """An input quantizer in every QuantConv2d/QuantLinear (Genie/BRECQ style).

    The first layer in execution order takes one only with ``config.quantize_input``; first
    and last layers use ``first_layer_bits``/``last_layer_bits`` when set, the second layer's
    input ``second_input_bits``.
    """
    first = run.layer_order[0] if run.layer_order else None
    last = run.layer_order[-1] if run.layer_order else None
    second = run.layer_order[1] if len(run.layer_order) > 1 else None
    placed = 0
    for name, module in model.named_modules():
        if not isinstance(module, (QuantConv2d, QuantLinear)):
            continue
        if name == first and not config.quantize_input:
            continue
        bits = config.input_bits(first=name == first, last=name == last)
        if name == second:
            bits = config.second_input(bits)
        module.input_quant = config.act_quantizer(bits=bits)
        placed += 1
    if not placed:
        raise _none_placed(
            model,
            "layer_inputs",
            "it has no quantized conv/linear layer besides the first, whose input (the network "
            "input) is quantized only with quantize_input=True",
        )
    return model


def after_relu(model: nn.Module, config: QuantConfig, run: DryRun) -> nn.Module:
    """A quantizer after every ReLU/ReLU6 call (``config.relu_types``), as in GDFQ.

    ``config.second_input_bits`` (when set) is the bit width of the quantizers at the ReLU
    calls made after the first conv/linear and before the second, in execution order: in a CNN
    the stem's output, which the second layer reads (what ``layer_inputs`` quantizes with it).

    When every ReLU module runs once and no functional ReLU runs, each ReLU module becomes
    ``nn.Sequential(relu, quantizer)`` (GDFQ's own rewrite; the model keeps its class).
    Otherwise (a ReLU module reused at several call sites, or ``F.relu``/``torch.relu``/
    ``F.relu6``/... calls), the model is rewritten with ``torch.fx`` and a distinct quantizer is
    inserted after each call site; the returned ``GraphModule`` must then be used.
    """
    if not run.relu_sites:
        raise _none_placed(
            model,
            "after_relu",
            f"no {'/'.join(t.__name__ for t in config.relu_types)} module or functional relu "
            "ran in the dry run; use policy='layer_inputs' or set QuantConfig.relu_types",
        )
    if run.functional_relus == 0 and max(run.relu_calls.values()) == 1:
        return _wrap_relu_modules(model, config, run)
    return _insert_after_relu_calls(model, config, run)


def _wrap_relu_modules(model: nn.Module, config: QuantConfig, run: DryRun) -> nn.Module:
    called = {id(model.get_submodule(name)) for name in run.relu_calls}
    wrapped: dict[int, nn.Sequential] = {}  # by ReLU object: one wrapper for all its aliases
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name or not isinstance(module, config.relu_types) or id(module) not in called:
            continue
        if id(module) not in wrapped:
            stem = name in run.stem_relus
            bits = config.second_input(config.a_bits) if stem else config.a_bits
            quantizer = config.act_quantizer(bits=bits)
            wrapped[id(module)] = nn.Sequential(module, quantizer)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, wrapped[id(module)])
    return model


def _insert_after_relu_calls(model: nn.Module, config: QuantConfig, run: DryRun) -> nn.Module:
    # Modules with no ReLU inside stay opaque to fx: fewer ways for tracing to fail, and their
    # parameters and buffers stay exactly as they are.
    leaf_names = {
        name
        for name, module in model.named_modules()
        if name
        and name not in run.relu_owners
        and not any(isinstance(m, config.relu_types) for m in module.modules())
    }
    leaf_types = config.relu_types + (QuantConv2d, QuantLinear, ActQuantizer)
    try:
        gm = trace(model, leaf_types=leaf_types, leaf_names=leaf_names)
    except Exception as error:  # fx raises many types (TraceError, TypeError, ...)
        raise RuntimeError(
            f"after_relu: {type(model).__name__} reuses a ReLU module at several call sites or "
            "calls a functional relu, so quantizers must be inserted per call site with "
            f"torch.fx.symbolic_trace, which failed: {type(error).__name__}: {error}. Make the "
            "forward fx-traceable, give each call site its own ReLU module, or use "
            "policy='layer_inputs'."
        ) from error

    layers_seen = [0]  # quantized conv/linear calls before the node: insert_after walks in order

    def is_relu_site(node: fx.Node) -> bool:
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))  # a layer, or an opaque leaf holding some
            layers_seen[0] += sum(
                isinstance(m, (QuantConv2d, QuantLinear)) for m in module.modules()
            )
            return isinstance(module, config.relu_types)
        if node.op in ("call_function", "call_method"):
            return is_relu_call(node.target, node.args, node.kwargs)
        return False

    def make() -> nn.Module:  # called right after is_relu_site picked the node
        stem = layers_seen[0] == 1
        return config.act_quantizer(
            bits=config.second_input(config.a_bits) if stem else config.a_bits
        )

    names = insert_after(gm, is_relu_site, make, suffix="_quant")
    if len(names) != run.relu_sites:
        warnings.warn(
            f"after_relu: the dry run of {type(model).__name__} saw {run.relu_sites} ReLU calls "
            f"but the traced graph has {len(names)} ReLU call sites (a ReLU inside a torch.nn "
            "leaf module, or control flow?); only the traced ones are quantized",
            stacklevel=3,
        )
    return gm


def vit(model: nn.Module, config: QuantConfig, run: DryRun) -> nn.Module:
    """ViT placement (PSAQ-ViT's quantized tensors, by operand): the input of every
    ``QuantLinear`` (qkv, proj, fc1, fc2, head), both operands of the attention's two matmuls
    and the attention logits before the softmax (:mod:`dfqkit.quant.attention`). LayerNorm,
    softmax and GELU compute in floating point. The patch-embedding convolution's weight is
    quantized; its input (the image) only with ``config.quantize_input``.

    A ViT with ``L`` blocks gets ``9·L + 1`` activation quantizers (4 linear inputs and 5
    attention operands per block, plus the head's input).
    """
    first = run.layer_order[0] if run.layer_order else None
    last = run.layer_order[-1] if run.layer_order else None
    attentions = [m for m in model.modules() if is_attention(m)]
    if not attentions:
        raise _none_placed(
            model,
            "vit",
            "it has no timm-style attention module (one with qkv, num_heads and fused_attn)",
        )
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) or (
            isinstance(module, QuantConv2d) and name == first and config.quantize_input
        ):
            bits = config.input_bits(first=name == first, last=name == last)
            module.input_quant = config.act_quantizer(bits=bits)
    for module in attentions:
        quantize_attention_(module, lambda: config.act_quantizer(bits=config.a_bits))
    return model


POLICIES: dict[str, Policy] = {
    "after_relu": after_relu,
    "layer_inputs": layer_inputs,
    "vit": vit,
}
