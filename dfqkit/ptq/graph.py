"""The layer chains of a float model that the data-free transforms act on, read from its fx graph.

Two patterns, both found on the model's fx graph (:func:`trace`: standard ``torch.nn`` modules
are leaves, and so are subclasses of a conv, linear or batch-norm layer, such as timm's
``Conv2dSame`` and ``BatchNormAct2d``; everything else is traced into, so names are the model's
own module names). A batch norm that applies its own activation (timm's ``BatchNormAct2d``:
``act(drop(bn(x)))``, ``drop`` an identity or dropout) counts as the norm followed by that
activation:

* a **pair** for cross-layer equalization: ``A → [BN] → [activation] → [pass-through]* → B``
  where ``A`` and ``B`` are both ``nn.Conv2d`` or both ``nn.Linear``, every node on the way
  has exactly one user (a pure chain: a residual add or any other fan-out breaks it), the
  activation is positively homogeneous (``relu(x/s) = relu(x)/s`` for ``s > 0``) and the
  pass-through modules act per channel and commute with a positive per-channel factor
  (identity, dropout, max/average pooling);
* a **site** for bias correction: ``BN → [activation] → [identity/dropout]* → B`` read
  backwards from ``B``'s input (the BN output may feed other nodes too: its distribution is
  the same for all of them).

A pattern that reaches a second layer but cannot be used is returned as a *skip* with its
reason, so the transforms can log it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn import functional as F

from dfqkit.errors import ConfigError
from dfqkit.quant.modules import quant_class

LAYERS = (nn.Conv2d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
#: per-channel modules that commute with a positive per-channel factor (CLE chains)
PASS_THROUGH = (nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
#: modules whose output has the input's per-channel mean (bias-correction sites)
MEAN_PRESERVING = (nn.Identity, nn.Dropout)
_RELU_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}


@dataclass(frozen=True)
class Activation:
    """An activation by kind: ``"identity"``, ``"relu"``, ``"relu6"`` or ``"leaky_relu"``
    (with its ``slope``); ``"other"`` is anything else (named in ``what``)."""

    kind: str
    slope: float = 0.0
    what: str = ""

    @property
    def homogeneous(self) -> bool:
        return self.kind in ("identity", "relu", "leaky_relu")


@dataclass(frozen=True)
class Pair:
    """``first → [norm] → act → second``: module names (``norm`` is ``None`` without BN)."""

    first: str
    second: str
    norm: str | None
    act: Activation


@dataclass(frozen=True)
class Site:
    """``norm → act → layer``: the layer's input is the activation of a BN's output."""

    layer: str
    norm: str
    act: Activation


class _Tracer(fx.Tracer):
    """fx's tracer with conv, linear and batch-norm subclasses as leaves: their ``forward`` may
    hold control flow on the input's shape (timm's ``Conv2dSame`` computes its padding from it)
    that fx cannot trace, and the patterns read them as the layers they are."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LAYERS + NORMS) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, who: str) -> fx.GraphModule:
    """The fx graph of ``model`` (:class:`_Tracer`); a model fx cannot trace is refused naming
    ``who``."""
    try:
        return fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    except Exception as err:  # fx raises many kinds (TraceError, TypeError, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{who} reads the model's graph with torch.fx, which cannot trace "
            f"{type(model).__name__}: {first}"
        ) from err


def is_float_layer(module: nn.Module) -> bool:
    """A float conv or linear layer that ``quantize_`` quantizes (:func:`quant_class`): one that
    keeps its base class's ``forward``, or timm's ``Conv2dSame`` (zero "SAME" padding, then the
    convolution: scaling its input or output channels commutes with the padding)."""
    return isinstance(module, LAYERS) and quant_class(module) is not None


def _module_activation(m: nn.Module) -> Activation | None:
    if type(m) is nn.ReLU:
        return Activation("relu")
    if type(m) is nn.ReLU6:
        return Activation("relu6")
    if type(m) is nn.LeakyReLU:
        return Activation("leaky_relu", slope=float(m.negative_slope))
    if isinstance(m, nn.Hardtanh | nn.GELU | nn.SiLU | nn.Hardswish | nn.Sigmoid | nn.Tanh):
        return Activation("other", what=type(m).__name__)
    return None


def fused_activation(norm: nn.Module) -> Activation | None:
    """The activation a batch norm applies itself (timm's ``BatchNormAct2d``), ``None`` for a
    plain one or an identity; ``"other"`` for anything it cannot vouch for."""
    act, drop = getattr(norm, "act", None), getattr(norm, "drop", None)
    if drop is not None and not isinstance(drop, nn.Identity | nn.Dropout):
        return Activation("other", what=f"{type(norm).__name__}.drop = {type(drop).__name__}")
    if act is None or isinstance(act, nn.Identity):
        return None
    return _module_activation(act) or Activation(
        "other", what=f"{type(norm).__name__}.act = {type(act).__name__}"
    )


def _module(graph: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return graph.get_submodule(node.target) if node.op == "call_module" else None


def activation(graph: fx.GraphModule, node: fx.Node) -> Activation | None:
    """The activation ``node`` computes, or ``None`` when it is not an activation."""
    m = _module(graph, node)
    if m is not None:
        return _module_activation(m)
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        kind = _RELU_FUNCTIONS[node.target]
        what = "F.relu6 (a function, never replaced)" if kind == "relu6" else ""
        return Activation(kind, what=what)
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return Activation("relu")
    if node.op == "call_function" and node.target in (F.gelu, F.silu, F.hardtanh, torch.sigmoid):
        return Activation("other", what=getattr(node.target, "__name__", str(node.target)))
    return None


def _label(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def _calls(graph: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def _norm_ok(norm: nn.Module) -> str:
    if not norm.affine:
        return "has no affine parameters to scale"
    if norm.running_var is None:
        return "has no running statistics"
    return ""


def pairs(graph: fx.GraphModule) -> tuple[list[Pair], list[str]]:
    """Every equalizable pair of ``graph``, in graph order, and why others were skipped."""
    calls = _calls(graph)
    found: list[Pair] = []
    skipped: list[str] = []
    for node in graph.graph.nodes:
        first = _module(graph, node)
        if first is None or not is_float_layer(first):
            continue
        norm = act = None
        cur = node
        while True:
            users = list(cur.users)
            if len(users) != 1:
                if len(users) > 1:
                    skipped.append(
                        f"{node.target}: the output of {_label(cur)} feeds {len(users)} nodes "
                        "(a residual branch or another fan-out), not one layer"
                    )
                break
            cur = users[0]
            m = _module(graph, cur)
            a = activation(graph, cur)
            if m is not None and is_float_layer(m):
                reason = _pair_reason(node, cur, first, m, norm, act, calls, graph)
                if reason:
                    skipped.append(f"{node.target} → {cur.target}: {reason}")
                else:
                    norm_name = None if norm is None else norm.target
                    found.append(
                        Pair(node.target, cur.target, norm_name, act or Activation("identity"))
                    )
                break
            if isinstance(m, NORMS) and norm is None and act is None:
                norm, act = cur, fused_activation(m)
            elif a is not None and act is None:
                act = a
            elif not isinstance(m, PASS_THROUGH):
                break
    return found, skipped


def _pair_reason(node, cur, first, second, norm, act, calls, graph) -> str:
    if isinstance(first, nn.Conv2d) != isinstance(second, nn.Conv2d):
        return f"{type(first).__name__} then {type(second).__name__} (not the same kind of layer)"
    for n in (node, cur):
        if calls[n.target] != 1:
            return f"{n.target} is called {calls[n.target]} times"
    if norm is not None and _norm_ok(graph.get_submodule(norm.target)):
        return f"the batch norm {norm.target} {_norm_ok(graph.get_submodule(norm.target))}"
    if act is not None and not act.homogeneous:
        fix = ""
        if act.kind == "relu6" and not act.what:
            fix = " (CrossLayerEqualization.relu6 = 'relu' replaces ReLU6 by ReLU)"
        return f"the activation {act.what or act.kind} is not positively homogeneous{fix}"
    return ""


def sites(graph: fx.GraphModule) -> list[Site]:
    """Every conv/linear whose input is a BN output through an activation, in graph order."""
    found: list[Site] = []
    for node in graph.graph.nodes:
        layer = _module(graph, node)
        if layer is None or not is_float_layer(layer) or not node.args:
            continue
        cur, act = node.args[0], None
        while isinstance(cur, fx.Node):
            m = _module(graph, cur)
            a = activation(graph, cur)
            if isinstance(m, NORMS):
                fused = fused_activation(m)
                if fused is not None and act is not None:
                    break  # an activation after the norm's own: not a pattern the forms cover
                act = act or fused
                if act is None or act.kind != "other":
                    found.append(Site(node.target, cur.target, act or Activation("identity")))
                break
            if a is not None and act is None:
                act = a
            elif not isinstance(m, MEAN_PRESERVING):
                break
            cur = cur.args[0] if cur.args else None
    return found
