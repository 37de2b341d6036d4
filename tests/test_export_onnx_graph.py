"""Batch-norm folding into quantized convolutions, and what the exported graph holds."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dfqkit.export_onnx import export_model_onnx
from dfqkit.quant import QuantConfig, quantize_, set_quant_mode

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
numpy_helper = onnx.numpy_helper


class _ConvBN(nn.Module):
    def __init__(self, relu_between: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, bias=True)
        self.relu = nn.ReLU() if relu_between else nn.Identity()
        self.bn = nn.BatchNorm2d(6)
        with torch.no_grad():  # signs mixed: channels 1 and 4 get a negative BN factor
            self.bn.weight.copy_(torch.tensor([1.5, -0.7, 0.2, 3.0, -2.0, 0.9]))
            self.bn.bias.uniform_(-1, 1)
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.2, 3.0)

    def forward(self, x):
        return self.bn(self.relu(self.conv(x)))


def _student(relu_between: bool, w_bits: int) -> nn.Module:
    torch.manual_seed(0)
    model = _ConvBN(relu_between).eval()
    config = QuantConfig(w_bits=w_bits, a_bits=8, policy="layer_inputs", quantize_input=True)
    student = quantize_(model, config, torch.zeros(2, 3, 8, 8))
    set_quant_mode(student, "observe")
    with torch.no_grad():
        student(torch.randn(8, 3, 8, 8))
    set_quant_mode(student, "frozen")
    return student.eval()


def _session(path):
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("w_bits", [4, 8])
def test_a_batch_norm_after_a_quantized_conv_folds_into_its_weight_scale(tmp_path, w_bits):
    student = _student(relu_between=False, w_bits=w_bits)
    path = export_model_onnx(student, torch.zeros(1, 3, 8, 8), tmp_path / "m.onnx")
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 1
    # the folded weight is the same integer grid, scaled per channel by f = γ / sqrt(σ² + ε);
    # channels with f < 0 have negated codes and zero point, still inside int8 (at 8 bits a
    # code −128 negates to 128, so both are shifted by one)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dq = next(
        n for n in model.graph.node if n.op_type == "DequantizeLinear" and "codes" in n.input[0]
    )
    codes, scale, zp = (inits[name] for name in dq.input)
    assert codes.dtype == np.int8 and (scale > 0).all()
    layer, bn = student.conv, student.bn
    w_hat = layer.weight_quant(layer.weight).detach().double()
    factor = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    folded = (codes.astype(np.float64) - zp[:, None, None, None]) * scale[:, None, None, None]
    np.testing.assert_allclose(folded, (factor[:, None, None, None] * w_hat).numpy(), rtol=1e-6)
    q, _, z = layer.weight_quant.codes(layer.weight)
    n = (q + z).numpy().astype(np.int64)  # the grid indices before folding
    n_folded = codes.astype(np.int64) - zp.astype(np.int64)[:, None, None, None]
    sign = np.where(factor.numpy() < 0, -1, 1)[:, None, None, None]
    assert (n_folded == sign * n).all()
    if w_bits == 8:
        assert codes.min() == -128 and codes.max() == 127  # the shift kept int8 full
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        want = student(x)
    got = torch.from_numpy(_session(path).run(None, {"images": x.numpy()})[0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # float rounding only


def test_a_batch_norm_not_directly_after_the_conv_is_kept(tmp_path):
    student = _student(relu_between=True, w_bits=4)
    path = export_model_onnx(student, torch.zeros(1, 3, 8, 8), tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("BatchNormalization") == 1
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        want = student(x)
    got = torch.from_numpy(_session(path).run(None, {"images": x.numpy()})[0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_4_bit_file_is_smaller_than_the_float_one_and_holds_integer_weights(tmp_path):
    from dfqkit.models import mnist_resnet

    torch.manual_seed(0)
    teacher = mnist_resnet(weights=None).eval()
    float_path = tmp_path / "float.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(teacher, (torch.zeros(1, 1, 28, 28),), str(float_path), dynamo=False)
    student = quantize_(teacher, QuantConfig(w_bits=4, a_bits=4), torch.zeros(2, 1, 28, 28))
    set_quant_mode(student, "observe")
    with torch.no_grad():
        student(torch.randn(8, 1, 28, 28))
    path = export_model_onnx(student, torch.zeros(1, 1, 28, 28), tmp_path / "q.onnx")
    model = onnx.load(str(path))
    float_params = sum(
        t.dims[0] * int(np.prod(t.dims[1:]))
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 1
    )
    assert float_params == 0  # every weight matrix is stored as codes
    assert path.stat().st_size < 0.4 * float_path.stat().st_size
