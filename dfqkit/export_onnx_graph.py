"""Passes over an exported ONNX graph: batch-norm folding, constants, opset.

**Folding a batch norm into a quantized convolution.** The student keeps the teacher's batch
norms (eval mode) after its quantized convolutions: ``BN(conv(x, s·n) + b)`` per output
channel ``c`` is ``f_c · conv(x, s_c·n_c) + (b_c − μ_c)·f_c + β_c`` with
``f_c = γ_c / sqrt(σ²_c + ε)``. A per-channel factor commutes with a per-output-channel
quantized weight: ``f_c · s_c · n_c = (|f_c| · s_c) · (sign(f_c) · n_c)``, so the folded
convolution keeps the same integer grid with the scale ``s'_c = |f_c| · s_c`` and, for a
negative ``f_c``, negated codes and zero point (``(y − zp) → (−y) − (−zp)``, shifted together
by a constant where ``−y`` would leave the container). The weight is therefore still exactly
the same k-bit grid; only the float products are rounded differently (fp32 ``s'`` versus BN
applied to the convolution's output), a relative difference of ~1e-7.

It is done only when that is exact in this sense: the convolution's weight is
``DequantizeLinear`` of constants with one scale per output channel (or one per tensor, which
is broadcast), the weight feeds nothing else, the convolution's output feeds exactly one node,
an inference ``BatchNormalization`` with constant parameters, and no ``f_c`` is 0 (a zero scale
would be a degenerate grid). A batch norm elsewhere (after an activation quantizer, or after a
residual add) stays a ``BatchNormalization`` node. A per-tensor *activation* grid cannot absorb
a per-channel factor, so a batch norm is never folded across an activation quantizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

try:
    import onnx
    from onnx import numpy_helper
except ImportError:  # without the [onnx] extra, the export says so when it is asked for
    onnx = numpy_helper = None

#: ops whose semantics (not only their type lists) changed between opset 17 and 21
_CHANGED_BY_OPSET_21 = frozenset({"GroupNormalization"})
_INT_RANGES = {
    np.dtype(t): (int(np.iinfo(t).min), int(np.iinfo(t).max)) for t in (np.uint8, np.int8, np.int16)
}


def _attr(node: onnx.NodeProto, name: str, default: float | int | None) -> float | int | None:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def constants_to_initializers(model: onnx.ModelProto) -> None:
    """Move every ``Constant`` node holding a tensor into the graph's initializers."""
    graph = model.graph
    keep = []
    for node in graph.node:
        value = _attr(node, "value", None) if node.op_type == "Constant" else None
        if value is None:
            keep.append(node)
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value)
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
    del graph.node[:]
    graph.node.extend(keep)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    for out in graph.output:
        users.setdefault(out.name, []).append(None)  # a graph output counts as a consumer
    return users


def _through_identities(name: str, producer: dict[str, onnx.NodeProto]) -> str:
    """The tensor ``name`` copies (the exporter shares equal initializers through Identity)."""
    while name in producer and producer[name].op_type == "Identity":
        name = producer[name].input[0]
    return name


def fold_batch_norms(model: onnx.ModelProto) -> int:
    """Fold each ``BatchNormalization`` that follows a quantized ``Conv`` (see the module
    docstring for when); returns how many were folded."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    users = _consumers(graph)
    removed: list[onnx.NodeProto] = []
    for conv in list(graph.node):
        if conv.op_type != "Conv" or len(users.get(conv.output[0], [])) != 1:
            continue
        bn = users[conv.output[0]][0]
        dq = producer.get(conv.input[1])
        if bn is None or bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        if dq is None or dq.op_type != "DequantizeLinear" or len(users[dq.output[0]]) != 1:
            continue
        params = [*dq.input, *bn.input[1:], *conv.input[2:]]
        sources = {name: _through_identities(name, producer) for name in params}
        if len(dq.input) != 3 or not all(src in inits for src in sources.values()):
            continue
        arrays = {name: numpy_helper.to_array(inits[src]) for name, src in sources.items()}
        codes, scale, zp = (arrays[n] for n in dq.input)
        if codes.dtype not in _INT_RANGES:
            continue
        gamma, beta, mean, var = (arrays[n].astype(np.float64) for n in bn.input[1:])
        factor = gamma / np.sqrt(var + float(_attr(bn, "epsilon", 1e-5)))
        if scale.ndim > 1 or (scale.ndim == 1 and int(_attr(dq, "axis", 1)) != 0):
            continue
        if not np.all(factor != 0):
            continue
        channels = codes.shape[0]
        scale = np.broadcast_to(scale.astype(np.float64), (channels,))
        zp = np.broadcast_to(zp, (channels,))
        codes, zp = _flip_channels(codes, zp, factor < 0)
        bias = arrays[conv.input[2]].astype(np.float64) if len(conv.input) > 2 else 0.0
        new = {
            "codes": codes,
            "scale": (scale * np.abs(factor)).astype(np.float32),
            "zero_point": zp,
            "bias": ((bias - mean) * factor + beta).astype(np.float32),
        }
        names = {}
        for key, value in new.items():
            names[key] = f"{conv.name or conv.output[0]}.bn_folded.{key}"
            graph.initializer.append(numpy_helper.from_array(value, names[key]))
        del dq.input[:]
        dq.input.extend([names["codes"], names["scale"], names["zero_point"]])
        _set_axis(dq, 0)
        del conv.input[2:]
        conv.input.append(names["bias"])
        conv.output[0] = bn.output[0]
        removed.append(bn)
    for bn in removed:
        graph.node.remove(bn)
    remove_unused_initializers(model)
    return len(removed)


def _flip_channels(codes: np.ndarray, zp: np.ndarray, flip: np.ndarray) -> tuple[np.ndarray, ...]:
    """Negate codes and zero point of the channels in ``flip``: ``(y − zp)`` becomes
    ``(−y) − (−zp)``, both shifted per channel by the constant nearest 0 that keeps them in the
    (int8 or int16) container; one exists, since the negated values span what the originals
    did."""
    dtype = codes.dtype
    if not flip.any():
        return codes, np.ascontiguousarray(zp)
    wide = codes.astype(np.int64).reshape(codes.shape[0], -1)
    wzp = zp.astype(np.int64).copy()
    wide[flip], wzp[flip] = -wide[flip], -wzp[flip]
    cmin, cmax = _INT_RANGES[np.dtype(dtype)]
    both = np.concatenate([wide, wzp[:, None]], axis=1)
    low, high = cmin - both.min(axis=1), cmax - both.max(axis=1)  # allowed shifts
    shift = np.clip(0, low, high)  # span(both) = span before ≤ cmax − cmin: never empty
    wide, wzp = wide + shift[:, None], wzp + shift
    return wide.reshape(codes.shape).astype(dtype), wzp.astype(dtype)


def _set_axis(node: onnx.NodeProto, axis: int) -> None:
    for a in node.attribute:
        if a.name == "axis":
            a.i = axis
            return
    node.attribute.append(onnx.helper.make_attribute("axis", axis))


def remove_unused_initializers(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads (the Identity copies of folded batch-norm
    parameters), then initializers that no node reads (and that are not graph outputs)."""
    graph = model.graph
    while True:
        read = {name for node in graph.node for name in node.input}
        read |= {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(out in read for out in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def set_opset(model: onnx.ModelProto, opset: int) -> None:
    """Declare ``opset`` for the default domain; refuses a graph with an op whose meaning
    changed on the way (the exporter wrote ≤ 20; int16 QuantizeLinear needs 21)."""
    changed = {n.op_type for n in model.graph.node} & _CHANGED_BY_OPSET_21
    if opset >= 21 and changed:
        raise ValueError(f"cannot raise the ONNX opset to {opset}: the graph has {sorted(changed)}")
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = max(entry.version, opset)


def finalize_onnx(path: Path, *, opset: int, fold_batch_norm: bool = True) -> None:
    """Constants to initializers, batch norms folded, the opset declared, checked, saved."""
    model = onnx.load(str(path))
    constants_to_initializers(model)
    if fold_batch_norm:
        fold_batch_norms(model)
    remove_unused_initializers(model)
    set_opset(model, opset)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
