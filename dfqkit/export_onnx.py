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
from dfqkit.rundir import load_run, record_model

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


def export_onnx(run_dir: Path, out: Path | None = None, *, which: str | None = None) -> Path:
    """Write ``run_dir``'s student (checkpoint ``which``: ``"best"``, ``"last"``, or ``None``
    for the best when the run kept one) as ONNX with QDQ nodes; records in ``metrics.json``
    which epoch the file holds."""
    run = load_run(run_dir, which=which)
    size, channels = run.data.image_size, run.data.channels
    out = Path(out) if out is not None else Path(run_dir) / "student_qdq.onnx"
    path = export_model_onnx(run.student_module.cpu(), torch.zeros(1, channels, size, size), out)
    record_model(run_dir, path, run.loaded)
    return path
