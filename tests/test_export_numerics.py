"""The exported computation equals the student's fake quantization (ONNX and safetensors).

A seeded loop over every bit width 2..8 (and some wider ones) and random ranges, including
ranges that exclude 0 and weight channels of one sign. What "equal" means:

* weights (ONNX and safetensors) and LSQ activations: bit for bit. The integer codes are
  computed once in PyTorch and dequantized with the same fp32 product ``s · n`` (LSQ's
  frozen forward divides by ``s`` exactly as ``QuantizeLinear`` does);
* Eq. 14 activations in ONNX: bit for bit except where ``x / s`` lies within float rounding of
  a half-integer, where the two sides may round to neighbouring codes (one step ``s`` apart):
  dfqkit computes ``x · (1/s) − z``, ``QuantizeLinear`` computes ``x / s``.

onnxruntime runs the graph as written with ``session.disable_quant_qdq = 1``; its default
session swaps in integer kernels that round differently (docs/quantization.md).
"""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dfqkit.export import quantized_tensors
from dfqkit.export_onnx import export_model_onnx
from dfqkit.quant import (
    EMAActQuantizer,
    LearnableClipActQuantizer,
    LSQActQuantizer,
    MinMaxWeightQuantizer,
    SymmetricWeightQuantizer,
)
from dfqkit.quant.modules import QuantLinear

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _run(model, example, tmp_path, x):
    path = export_model_onnx(model, example, tmp_path / "m.onnx")
    # the file's semantics: onnxruntime's default session would replace DequantizeLinear →
    # MatMul by its own MatMulNBits kernel, which rounds differently
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), onnx.load(str(path))


def _frozen(quantizer, lo, hi):
    with torch.no_grad():
        quantizer.lo.fill_(lo)
        quantizer.hi.fill_(hi)
        quantizer.num_updates.fill_(1)
    quantizer._updates = 1
    quantizer.mode = "frozen"
    return quantizer


class _Stack(nn.Module):
    """Every quantizer applied to the same input, outputs stacked along dim 1."""

    def __init__(self, quantizers):
        super().__init__()
        self.quantizers = nn.ModuleList(quantizers)

    def forward(self, x):
        return torch.stack([q(x) for q in self.quantizers], dim=1)


def _random_ranges(rng, n):
    """Ranges containing 0, all positive (like a drifted learnable lower bound), all negative,
    and narrow ones far from 0."""
    ranges = [(0.2, 10.0), (0.0, 6.0), (-3.0, -0.5)]  # the range first
    for _ in range(n):
        kind = rng.integers(4)
        a, b = sorted(rng.uniform(0.01, 8.0, size=2) * rng.choice([0.1, 1.0, 10.0]))
        ranges.append({0: (-a, b), 1: (a, b + 0.01), 2: (-b - 0.01, -a), 3: (b, b + a / 50)}[kind])
    return ranges


def _inputs(rng, quantizers):
    """Uniform values around every range, plus each grid's points and exact ties (where the
    rounding is most fragile), as one ``(1, n)`` batch."""
    lo = min(q.lo.item() for q in quantizers) - 1.0
    hi = max(q.hi.item() for q in quantizers) + 1.0
    parts = [torch.from_numpy(rng.uniform(lo, hi, size=4096).astype(np.float32))]
    for q in quantizers:
        s, n_lo = q.export_grid()
        n = torch.arange(-4, 2**q.bits + 4, dtype=torch.float32) + n_lo.float()
        parts += [s * n, s * (n + 0.5)]
    return torch.cat(parts)[None]


@pytest.mark.parametrize("bits", range(2, 9))
def test_activation_qdq_equals_fake_quantization_on_random_ranges(tmp_path, bits):
    rng = np.random.default_rng(bits)
    quantizers = [_frozen(EMAActQuantizer(bits=bits), lo, hi) for lo, hi in _random_ranges(rng, 6)]
    quantizers.append(_frozen(LearnableClipActQuantizer(bits=bits), 0.2, 10.0))  # drifted lo
    x = _inputs(rng, quantizers)
    model = _Stack(quantizers).eval()
    with torch.no_grad():
        want = model(x)
    got, _ = _run(model, x, tmp_path, x)
    for i, q in enumerate(quantizers):
        s = q.export_grid()[0].double()
        t = x.double() / s
        # within a few fp32 roundings of a half-integer (relative to |x / s|: far from 0, as
        # for a narrow range like [0.78, 0.80], one ulp of x / s is already ~1e-4)
        tie = ((t - t.floor()) - 0.5).abs() < 1e-6 + 4e-7 * t.abs()
        differ = got[:, i] != want[:, i]
        assert not (differ & ~tie).any(), (bits, q.lo.item(), q.hi.item())
        codes_apart = (got[:, i].double() / s).round() - (want[:, i].double() / s).round()
        assert (codes_apart[differ].abs() == 1).all(), (bits, i)  # neighbouring codes
        assert differ[:, :4096].float().mean() < 1e-3, (bits, i)  # random values: ~never


def _lsq(bits, scale, signed):
    q = LSQActQuantizer(bits=bits)
    with torch.no_grad():
        q.scale.fill_(scale)
        q.signed.fill_(signed)
        q.num_updates.fill_(1)
    q.refresh_range_()
    q._updates = 1
    q.mode = "frozen"
    return q


@pytest.mark.parametrize("bits", range(2, 9))
def test_lsq_activation_qdq_is_bit_exact(tmp_path, bits):
    rng = np.random.default_rng(100 + bits)
    quantizers = [_lsq(bits, float(rng.uniform(0.01, 2.0)), signed) for signed in (0, 1, 0, 1)]
    x = _inputs(rng, quantizers)
    model = _Stack(quantizers).eval()
    with torch.no_grad():
        want = model(x)
    got, _ = _run(model, x, tmp_path, x)
    assert torch.equal(got, want)


def _weights(rng, out_features, in_features):
    """Output channels of mixed sign, all positive and all negative."""
    scale = rng.choice([0.01, 1.0, 30.0])
    w = rng.normal(size=(out_features, in_features)) * scale
    w[1] = np.abs(w[1]) + rng.uniform(0.0, 0.5) * scale
    w[2] = -np.abs(w[2]) - rng.uniform(0.0, 0.5) * scale
    return torch.from_numpy(w.astype(np.float32))


def _linear(weight, quantizer):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    quantized = QuantLinear.from_float(layer, weight_quant=quantizer, input_quant=None)
    return nn.Sequential(quantized).eval()


WEIGHT_QUANTIZERS = {
    "minmax per channel": lambda bits: MinMaxWeightQuantizer(bits=bits),
    "minmax per tensor": lambda bits: MinMaxWeightQuantizer(bits=bits, per_channel=False),
    "symmetric": lambda bits: SymmetricWeightQuantizer(bits=bits),
}


@pytest.mark.parametrize("kind", sorted(WEIGHT_QUANTIZERS))
@pytest.mark.parametrize("bits", [*range(2, 9), 9, 12, 16])
def test_exported_weights_equal_the_fake_quantized_weights(tmp_path, kind, bits):
    """ONNX: the identity input makes the output the dequantized weight, exactly; safetensors:
    the stored codes, scale and zero point give it back exactly, in an int8 container up to 8
    bits and int16 above (nothing clamped)."""
    rng = np.random.default_rng(bits)
    layer = _linear(_weights(rng, 6, 16), WEIGHT_QUANTIZERS[kind](bits))
    want = layer[0].weight_quant(layer[0].weight).detach()
    eye = torch.eye(16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, model = _run(layer, eye, tmp_path, eye)
    assert torch.equal(got, want.T)
    ops = {n.op_type for n in model.graph.node}
    assert "QuantizeLinear" not in ops and not {"ReduceMin", "ReduceMax"} & ops
    (codes,) = [t for t in model.graph.initializer if list(t.dims) in ([6, 16], [16, 6])]
    # ONNX containers: int8 holds every grid below 8 bits here, at 8 bits only grids that
    # contain 0 (a channel of one sign needs int16), above 8 bits int16; at 16 bits a channel
    # of one sign fits no container and the layer is stored as fp32, with a warning
    one_sign = kind == "minmax per channel"
    if bits < 8 or (bits == 8 and not one_sign):
        expected = onnx.TensorProto.INT8
    elif bits == 16 and one_sign:
        expected = onnx.TensorProto.FLOAT
    else:
        expected = onnx.TensorProto.INT16
    assert codes.data_type == expected
    fallback = [w for w in caught if "dequantized fp32 values" in str(w.message)]
    assert len(fallback) == (expected == onnx.TensorProto.FLOAT)
    tensors, layers = quantized_tensors(layer)
    q = tensors["0.weight.codes"]
    assert q.dtype == (torch.int8 if bits <= 8 else torch.int16) and layers["0"]["bits"] == bits
    assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1
    back = (q.float() + tensors["0.weight.zero_point"]) * tensors["0.weight.scale"]
    assert torch.equal(back, want)


def test_an_8_bit_activation_range_that_excludes_zero_is_exported_exactly(tmp_path):
    """The issue's case: [0.2, 10] at 8 bits returned a constant 0.1537 (int8 zero point
    −133 wrapped to 123); it now needs, and gets, an int16 container (opset 21)."""
    q = _frozen(EMAActQuantizer(bits=8), 0.2, 10.0)
    x = torch.linspace(-1.0, 12.0, 1001)[None]
    got, model = _run(nn.Sequential(q), x, tmp_path, x)
    assert torch.allclose(got, q(x), atol=0, rtol=0) or (got != q(x)).sum() <= 2
    assert got.unique().numel() > 200 and got.min() > 0.19  # the whole grid, no wrap
    zero_point = next(n for n in model.graph.node if n.op_type == "QuantizeLinear").input[2]
    zp = {t.name: t for t in model.graph.initializer}[zero_point]
    assert zp.data_type == onnx.TensorProto.INT16 and model.opset_import[0].version == 21


def test_a_16_bit_activation_grid_without_zero_is_refused_with_the_reason(tmp_path):
    q = _frozen(EMAActQuantizer(bits=16), 0.2, 10.0)
    model = nn.Sequential(nn.Identity(), q)
    with pytest.raises(ValueError, match=r"^1: its 16-bit grid .* refusing to export it inexact"):
        export_model_onnx(model, torch.zeros(1, 4), tmp_path / "m.onnx")


def test_a_weight_channel_of_equal_values_is_exported_exactly_as_floats_with_a_warning(tmp_path):
    """min = max puts the channel's grid on Eq. 14's 1e-8 range floor, ~10^8 steps from 0:
    no integer container holds it, so that layer's weight is stored as fp32 (said, not hidden)."""
    weight = _weights(np.random.default_rng(0), 4, 8)
    weight[3] = 0.37
    layer = _linear(weight, MinMaxWeightQuantizer(bits=4))
    eye = torch.eye(8)
    with pytest.warns(UserWarning, match=r"weight \(channel 3\).*dequantized fp32 values"):
        got, model = _run(layer, eye, tmp_path, eye)
    assert torch.equal(got, layer[0].weight_quant(layer[0].weight).detach().T)
    (codes,) = [t for t in model.graph.initializer if list(t.dims) in ([4, 8], [8, 4])]
    assert codes.data_type == onnx.TensorProto.FLOAT
