"""ONNX export of a run's quantized student with QuantizeLinear/DequantizeLinear pairs.

Every quantized tensor — each conv/linear weight (per output channel, ``axis = 0``) and each
activation at the placement policy's sites — becomes ``QuantizeLinear → Clip →
DequantizeLinear``. ONNX has no k-bit integer type, so codes travel in an **int8 container**:
``QuantizeLinear`` produces int8 with the zero point ``−z`` of Eq. 14 (``z`` is an integer, so
``round(x/s) − z`` is exactly Eq. 14's code), then ``Clip`` restricts it to the k-bit range
``[−2^(k−1), 2^(k−1) − 1]`` before ``DequantizeLinear``; any ``k ≤ 8`` is represented
exactly. Exported with PyTorch's TorchScript-based exporter (opset 17); the fake quantization
is written as an autograd function whose ONNX symbolic emits the three nodes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from dfqkit.quant import set_quant_mode
from dfqkit.quant.functional import _ONNX_EXPORT

OPSET = 17


def export_model_onnx(model: torch.nn.Module, example: torch.Tensor, out: Path) -> Path:
    """Export a frozen (fake-)quantized model with QDQ nodes; batch size is dynamic."""
    model = model.cpu().eval()
    set_quant_mode(model, "frozen")
    _ONNX_EXPORT[0] = True
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated in torch 2.9+
            torch.onnx.export(
                model,
                (example.cpu(),),
                str(out),
                dynamo=False,
                opset_version=OPSET,
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            )
    finally:
        _ONNX_EXPORT[0] = False
    return Path(out)


def export_onnx(run_dir: Path, out: Path | None = None) -> Path:
    """Write ``run_dir``'s student (newest checkpoint) as ONNX with QDQ nodes."""
    from dfqkit.train import load_run

    parts = load_run(run_dir)
    size, channels = parts["image_size"], parts["channels"]
    out = Path(out) if out is not None else Path(run_dir) / "student_qdq.onnx"
    return export_model_onnx(parts["student_module"], torch.zeros(1, channels, size, size), out)
