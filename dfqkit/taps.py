"""Forward hooks that capture the tensors losses read, installed only for declared needs.

A :class:`Taps` object is built once per model with the set of tap names some loss declared;
it installs hooks only for those, and only records while :attr:`Taps.enabled` (the trainer
turns it on around the forwards whose losses read taps, so evaluation forwards record nothing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from dfqkit.models.split import cut_indices, find_blocks, is_channels_last, pool_features
from dfqkit.quant.api import act_quantizers
from dfqkit.quant.attention import SecondMatmulRecorder, attention_modules

ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish)


def bn_layers(model: nn.Module) -> list[nn.Module]:
    """The model's batch-norm layers that hold running statistics."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]


def activation_sites(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs the ``activations`` tap records: the activation quantizers of
    a quantized model, otherwise its activation modules."""
    quantizers = act_quantizers(model)
    if quantizers:
        return quantizers
    return [m for m in model.modules() if isinstance(m, ACTIVATION_TYPES)]


def quantized_activation_calls(model: nn.Module, example: torch.Tensor) -> list[int]:
    """Call indices (in one forward) of the activation-quantizer calls whose input is the output
    of an activation module — the quantized activations that pair, in order, with a float
    model's activation outputs, whatever the placement (``after_relu``: every quantizer;
    ``vit``: the input quantizer of each MLP's second linear; ``layer_inputs``: the inputs
    of layers fed by an activation). Found by one forward on ``example``; quantizer states
    are restored afterwards."""
    quantizers = act_quantizers(model)
    saved = [{k: v.clone() for k, v in q.state_dict().items()} for q in quantizers]
    updates = [getattr(q, "_updates", 0) for q in quantizers]
    produced: set[int] = set()
    alive: list[torch.Tensor] = []  # keeps outputs alive so their ids are not reused
    calls: list[bool] = []

    def record(_m: nn.Module, _a: Any, out: torch.Tensor) -> None:
        alive.append(out)
        produced.add(id(out))

    handles = [
        m.register_forward_hook(record) for m in model.modules() if isinstance(m, ACTIVATION_TYPES)
    ]

    def consume(_m: nn.Module, args: tuple) -> None:
        key = id(args[0])
        calls.append(key in produced)
        produced.discard(key)  # an output feeding several quantizers pairs with the first

    handles += [q.register_forward_pre_hook(consume) for q in quantizers]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        for q, state, n in zip(quantizers, saved, updates, strict=True):
            q.load_state_dict(state)
            q._updates = n
    return [i for i, is_act in enumerate(calls) if is_act]


class Taps:
    """Hooks on ``model`` recording the tensors named in ``needs``.

    Supported taps:
        ``bn_inputs``: ``(input, bn_module)`` pairs for every BatchNorm layer with running stats.
        ``activations``: outputs of every activation module (ReLU, ReLU6, GELU, SiLU,
            Hardswish), in call order. In a quantized model (one holding activation
            quantizers) the outputs of the quantizers that quantize an activation output
            instead (found with ``example``: :func:`quantized_activation_calls`; without it,
            every quantizer), so a loss compares the student's *quantized* activations, one
            to one and in order with the teacher's activation outputs.
        ``attention``: the output of every attention's second matmul, ``softmax(q kᵀ) v`` of
            shape ``(b, heads, tokens, head_dim)`` (PSAQ-ViT's ``matmul2``), one per
            attention module in call order. The module's fused path is switched off while
            this tap exists (timm's ``fused_attn`` flag) and a TorchFunctionMode records the
            product during its forward (:mod:`dfqkit.quant.attention`).
        ``stages``: pooled features ``(b, C_j)`` at the ends of ``J`` even parts of the model
            (:mod:`dfqkit.models.split`), as a dict ``{J: [J tensors]}`` for every ``J`` in
            ``stage_parts``; only the cut blocks are hooked.
        ``block_attention``: for every block (:func:`~dfqkit.models.split.find_blocks`), in
            execution order, the L2-normalised channel attention of its output,
            ``normalize(mean over positions of out²)`` of shape ``(b, C)`` (HAST's feature
            attention).

    Args:
        model: the model to tap.
        needs: tap names some loss (or mixer) declared.
        model_name: how error messages name the model.
        stage_parts: the part counts ``J`` requested for ``stages``.
        example: an example input (orders the blocks by execution for ``stages``).
        bn_users: what needs ``bn_inputs`` and the fix, for the message of a BN-free model.

    Raises:
        ValueError: ``bn_inputs`` requested on a model without BatchNorm (e.g. a ViT), or an
            unknown tap name.
    """

    SUPPORTED = ("bn_inputs", "activations", "stages", "attention", "block_attention")

    def __init__(
        self,
        model: nn.Module,
        needs: Iterable[str],
        *,
        model_name: str = "model",
        stage_parts: Iterable[int] = (),
        example: torch.Tensor | None = None,
        bn_users: str = "BNStatsLoss: remove it from train.losses",
    ):
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
                    f"BN-free teachers such as ViTs cannot use {bn_users}"
                )
            for bn in bns:
                self._handles.append(bn.register_forward_pre_hook(self._bn_input))
        self._select: list[int] | None = None
        if "activations" in self.needs:
            sites = activation_sites(model)
            if example is not None and act_quantizers(model):
                self._select = quantized_activation_calls(model, example)
            for m in sites:
                self._handles.append(m.register_forward_hook(self._activation))
        if "attention" in self.needs:
            modules = attention_modules(model)
            if not modules:
                raise ValueError(
                    f"a loss needs attention outputs but {model_name} "
                    f"({type(model).__name__}) has no timm-style attention module"
                )
            for m in modules:
                m.fused_attn = False
                self._handles.append(m.register_forward_pre_hook(self._attention_enter))
                self._handles.append(m.register_forward_hook(self._attention_exit))
            self._attention_modes: list[Any] = []
        self._stage_cuts: dict[int, list[int]] = {}
        self._channels_last = False
        if "block_attention" in self.needs:
            blocks = find_blocks(model, example)
            self._channels_last = is_channels_last(blocks)
            modules = dict(model.named_modules())
            for name in blocks:
                self._handles.append(modules[name].register_forward_hook(self._block_attention))
        if "stages" in self.needs:
            parts = sorted(set(stage_parts))
            if not parts:
                raise ValueError(f"the 'stages' tap on {model_name} needs at least one part count")
            blocks = find_blocks(model, example)
            self._channels_last = is_channels_last(blocks)
            modules = dict(model.named_modules())
            hooked: set[int] = set()
            for j in parts:
                self._stage_cuts[j] = cut_indices(len(blocks), j)
                hooked.update(self._stage_cuts[j])
            for index in sorted(hooked):
                self._handles.append(
                    modules[blocks[index]].register_forward_hook(self._stage_hook(index))
                )
            self._stage_out: dict[int, torch.Tensor] = {}

    def _bn_input(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if self.enabled:
            self.store["bn_inputs"].append((args[0], module))

    def _activation(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self.enabled:
            self.store["activations"].append(output)

    def _attention_enter(self, module: nn.Module, args: Any) -> None:
        if self.enabled:
            mode = SecondMatmulRecorder()
            mode.__enter__()
            self._attention_modes.append(mode)

    def _attention_exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.enabled and self._attention_modes:
            mode = self._attention_modes.pop()
            mode.__exit__(None, None, None)
            if mode.product is None:
                raise RuntimeError(f"{type(module).__name__} made no second matmul to record")
            self.store["attention"].append(mode.product)

    def _block_attention(self, _module: nn.Module, _args: Any, output: Any) -> None:
        if self.enabled:
            x = output[0] if isinstance(output, tuple) else output
            squares = pool_features(x.float().pow(2), channels_last=self._channels_last)
            self.store["block_attention"].append(torch.nn.functional.normalize(squares, dim=1))

    def _stage_hook(self, index: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if self.enabled:
                self._stage_out[index] = pool_features(output, channels_last=self._channels_last)

        return hook

    def collect(self) -> dict[str, Any]:
        """Return what was recorded since the last call and start afresh."""
        out: dict[str, Any] = self.store
        if self._select is not None and "activations" in out:
            calls = out["activations"]
            out["activations"] = [calls[i] for i in self._select if i < len(calls)]
        if "stages" in self.needs:
            out["stages"] = {
                j: [self._stage_out[i] for i in cuts] for j, cuts in self._stage_cuts.items()
            }
            self._stage_out = {}
        self.store = {name: [] for name in self.needs}
        return out

    def __enter__(self) -> Taps:
        self.enabled = True
        self.store = {name: [] for name in self.needs}
        if self._stage_cuts:
            self._stage_out = {}
        return self

    def __exit__(self, *exc: Any) -> None:
        self.enabled = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def detach_taps(values: Any) -> Any:
    """A recording of one tap (tensors or ``(tensor, module)`` pairs, or the ``stages`` dict of
    lists), detached."""
    if isinstance(values, dict):
        return {k: detach_taps(v) for k, v in values.items()}
    out = []
    for v in values:
        if isinstance(v, tuple):
            out.append(tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in v))
        else:
            out.append(v.detach())
    return out


def cat_taps(first: Any, second: Any) -> Any:
    """Concatenate two recordings of one tap along the batch (lists of tensors or of
    ``(tensor, module)`` pairs, or the ``stages`` dict of lists); the second is detached."""
    if isinstance(first, dict):
        return {j: cat_taps(first[j], second[j]) for j in first}
    out = []
    for a, b in zip(first, second, strict=True):
        if isinstance(a, tuple):
            out.append((torch.cat([a[0], b[0].detach()]), *a[1:]))
        else:
            out.append(torch.cat([a, b.detach()]))
    return out


@contextlib.contextmanager
def no_grad_params(params: list[nn.Parameter]) -> Iterator[None]:
    """Context: ``params`` do not require gradients inside (restored afterwards), so a forward
    is differentiable in its inputs without building weight gradients."""
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
