"""Insert a module after chosen call sites of a torch.fx graph (one module per call site)."""

from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx
from torch import nn


class _Tracer(fx.Tracer):
    """Keeps ``leaf_types`` and the modules named in ``leaf_names`` opaque (not traced into)."""

    def __init__(self, leaf_types: tuple[type[nn.Module], ...], leaf_names: set[str]) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, self.leaf_types)
            or module_qualified_name in self.leaf_names
            or super().is_leaf_module(m, module_qualified_name)
        )


def trace(
    model: nn.Module, *, leaf_types: tuple[type[nn.Module], ...], leaf_names: set[str]
) -> fx.GraphModule:
    """``torch.fx`` symbolic trace keeping submodules (and so parameter names) as they are.

    The GraphModule holds the same submodule objects under the same qualified names, and the
    root's public plain attributes (``num_classes``, ...); submodules the forward never reaches
    are dropped, as are the root class's own methods.

    Raises:
        Whatever ``torch.fx`` raises for an untraceable forward (data-dependent control flow,
        ...).
    """
    tracer = _Tracer(leaf_types, leaf_names)
    graph = tracer.trace(model)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.training = model.training  # only the root flag: submodules keep their own
    for key, value in vars(model).items():
        if not key.startswith("_") and key != "training" and not hasattr(gm, key):
            setattr(gm, key, value)
    return gm


def _owner(node: fx.Node) -> str:
    """Qualified name of the innermost module whose forward made this call ("" = root)."""
    stack = node.meta.get("nn_module_stack")
    return next(reversed(stack.values()))[0] if stack else ""


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name, n = base, 0
    while True:
        try:
            gm.get_submodule(name)
        except AttributeError:
            return name
        n += 1
        name = f"{base}_{n}"


def insert_after(
    gm: fx.GraphModule,
    select: Callable[[fx.Node], bool],
    make: Callable[[], nn.Module],
    *,
    suffix: str,
) -> list[str]:
    """Insert ``make()`` after every node ``select`` picks; its users then read the new output.

    The module of a call to module ``a.b.relu`` is named ``a.b.relu{suffix}`` (then
    ``..._1``, ``..._2`` for further call sites); that of a function call made inside module
    ``a.b`` is named ``a.b.<function>{suffix}``.

    Args:
        gm: Graph module, changed in place and recompiled.
        select: Picks the nodes (e.g. ReLU call sites).
        make: Builds one fresh module per picked node.
        suffix: Name suffix of the inserted modules.

    Returns:
        Qualified names of the inserted modules, in graph order.
    """
    names = []
    for node in list(gm.graph.nodes):
        if not select(node):
            continue
        if node.op == "call_module":
            base = str(node.target)
        else:
            owner, fn = _owner(node), getattr(node.target, "__name__", str(node.target))
            base = f"{owner}.{fn}" if owner else fn
        name = _free_name(gm, base.rstrip("_") + suffix)
        gm.add_submodule(name, make())
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        names.append(name)
    gm.graph.lint()
    gm.recompile()
    return names
