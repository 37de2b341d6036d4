"""ONNX export of a run's quantized student: integer weights and QDQ activations, all constant.

    python -m dfqkit.export --run DIR --format onnx [--out FILE]

The file holds, for every quantized conv/linear layer, its weight as an **integer initializer**
``<layer>.weight_quant.codes`` with a per-output-channel ``scale`` and ``zero_point`` feeding
``DequantizeLinear`` (``axis = 0``), and for every activation quantizer a
``QuantizeLinear → [Clip →] DequantizeLinear`` pair with constant scale and zero point
(:mod:`dfqkit.quant.onnx_qdq`): nothing is computed from a range at run time. k-bit codes
travel in 8-bit containers (4-bit codes too: ONNX's int4 has no onnxruntime kernels for most
ops), int16 where a grid needs it (more than 8 bits, or an 8-bit grid that excludes 0;
opset 21); a weight grid that no container holds (a channel whose weights are all equal) is
stored as its exact fp32 values, with a warning (:mod:`dfqkit.quant.codes`). A batch norm that
directly follows a quantized convolution is folded into the weight's per-channel scale and a
float bias (:mod:`dfqkit.export_onnx_graph`).

The graph computes the fake-quantized student up to float rounding: ``QuantizeLinear`` divides
by the scale where dfqkit multiplies by its reciprocal, so a value within rounding of a tie
between two codes can land on either, and a folded batch norm rounds differently. onnxruntime
runs exactly that with ``session.disable_quant_qdq = 1``. Its default session instead rewrites
``DequantizeLinear → Conv → QuantizeLinear`` into integer ``QLinearConv`` kernels and, for
them, quantizes each float bias to int32 at ``s_x · s_w`` (and ``DequantizeLinear → MatMul``
into ``MatMulNBits``): the usual int8 deployment, which moves a convolution's output by up to
``s_x · s_w / 2`` and so flips codes near a rounding boundary (negligible at 8 bits, visible at
3-4 bits: docs/results.md).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from dfqkit.export_onnx_graph import finalize_onnx
from dfqkit.optional import require
from dfqkit.quant import ActQuantizer, set_quant_mode
from dfqkit.quant.codes import onnx_grid, weight_codes
from dfqkit.quant.functional import _ONNX_EXPORT
from dfqkit.quant.modules import QuantConv2d, QuantLinear
from dfqkit.quant.onnx_qdq import INT16_OPSET, weight_dq
from dfqkit.rundir import load_run, record_model

#: opset of a file whose containers are all 8-bit
OPSET = 17
#: the newest opset PyTorch's TorchScript exporter writes; an int16 file is raised to 21 after
_TORCHSCRIPT_MAX_OPSET = 20


class ExportedWeight(nn.Module):
    """Stands in for a layer's weight quantizer while the model is traced: the weight is
    ``DequantizeLinear`` of its codes (buffers, so they become named integer initializers).

    Args:
        codes: Stored values ``y = q + z + zp`` in the container type, shape of the weight; or
            the dequantized fp32 weight itself when ``scale`` is None (a grid that no integer
            container holds).
        scale: fp32, ``(c_out,)`` per channel or ``()`` per tensor.
        zero_point: ``zp`` in the container type, shape of ``scale``.
    """

    def __init__(
        self, codes: torch.Tensor, scale: torch.Tensor | None, zero_point: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)

    @classmethod
    def of(cls, layer: nn.Module, name: str) -> ExportedWeight:
        """The stored form of ``layer``'s weight (``layer.weight_quant.codes``, Eq. 14)."""
        q, scale, z = weight_codes(layer)
        bits = layer.weight_quant.bits
        per_channel = scale.dim() > 0
        scale = scale.detach().float().reshape(-1 if per_channel else ())
        z = z.detach().float().reshape(-1 if per_channel else ())
        shape = [-1] + [1] * (q.dim() - 1) if per_channel else []
        try:
            grid = onnx_grid(scale, z - 2 ** (bits - 1), bits, what=f"{name}.weight", weight=True)
        except ValueError as err:  # exact, but not integer: say so
            warnings.warn(f"{err}; exported as its dequantized fp32 values", stacklevel=2)
            n = q.detach().float() + z.reshape(shape)
            return cls((n * scale.reshape(shape)).contiguous(), None, None)
        n = q.detach().double() + z.double().reshape(shape)
        codes = (n + grid.zero_point.double().reshape(shape)).to(grid.dtype)
        return cls(codes.contiguous(), grid.scale, grid.zero_point.to(grid.dtype))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """The dequantized weight (``w``, the float weight, is not used)."""
        if self.scale is None:
            return self.codes
        return weight_dq(self.codes, self.scale, self.zero_point)


def _needs_int16(model: nn.Module, weights: dict[str, ExportedWeight]) -> bool:
    """Whether any tensor needs an int16 container; raises, with the quantizer's name, for an
    activation grid that no container holds (before anything is traced)."""
    dtypes = {w.codes.dtype for w in weights.values()}
    for name, module in model.named_modules():
        if isinstance(module, ActQuantizer):
            scale, n_lo = module.export_grid()
            try:
                dtypes.add(onnx_grid(scale, n_lo, module.bits, what=name, weight=False).dtype)
            except ValueError as err:
                raise ValueError(
                    f"{err}; refusing to export it inexactly (an activation grid must lie within "
                    "2^16 steps of 0, so at 16 bits it must contain 0)"
                ) from None
    return torch.int16 in dtypes


def export_model_onnx(
    model: nn.Module, example: torch.Tensor, out: Path, *, fold_batch_norm: bool = True
) -> Path:
    """Export a (fake-)quantized model as ONNX with integer weights and QDQ activations.

    The model is put in eval mode with its activation ranges frozen; its weight quantizers are
    replaced by :class:`ExportedWeight` only while tracing. The batch size is dynamic.

    Args:
        model: A student built by :func:`dfqkit.quant.quantize_` (or :func:`load_quantized`).
        example: One input batch, e.g. ``torch.zeros(1, 3, 224, 224)``.
        out: The ``.onnx`` file to write.
        fold_batch_norm: Fold a batch norm that directly follows a quantized convolution into
            the convolution's weight scale and bias (exact up to float rounding).

    Returns:
        ``out``.

    Raises:
        ValueError: A quantized tensor has no exact ONNX representation (the message names it).
    """
    require("onnx", extra="onnx", purpose="ONNX export")
    model = model.cpu().eval()
    set_quant_mode(model, "frozen")
    layers = {
        name: m for name, m in model.named_modules() if isinstance(m, QuantConv2d | QuantLinear)
    }
    weights = {name: ExportedWeight.of(layer, name) for name, layer in layers.items()}
    opset = INT16_OPSET if _needs_int16(model, weights) else OPSET
    originals = {name: layer.weight_quant for name, layer in layers.items()}
    _ONNX_EXPORT[0] = True
    try:
        for name, layer in layers.items():
            layer.weight_quant = weights[name]
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated in torch 2.9+
            torch.onnx.export(
                model,
                (example.cpu(),),
                str(out),
                dynamo=False,
                opset_version=min(opset, _TORCHSCRIPT_MAX_OPSET),
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            )
    finally:
        _ONNX_EXPORT[0] = False
        for name, layer in layers.items():
            layer.weight_quant = originals[name]
    finalize_onnx(Path(out), opset=opset, fold_batch_norm=fold_batch_norm)
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
