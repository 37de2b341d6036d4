"""Export a run's quantized student: integer weights with their scales, loadable again.

    python -m dfqkit.export --run DIR [--format safetensors] [--out FILE]

The ``safetensors`` file holds, for every quantized conv/linear layer ``L``:
``L.weight.codes`` (the integer codes ``q`` of Eq. 14 in ``[−2^(k−1), 2^(k−1) − 1]``, in an
int8 container for ``k ≤ 8`` and an int16 one for ``9 ≤ k ≤ 16``), ``L.weight.scale`` and
``L.weight.zero_point`` (fp32, per output channel; the weight is ``scale · (q + zero_point)``;
symmetric quantizers have zero point 0); every other tensor of the student's state dict as it
is (biases, BN statistics, and each activation quantizer's ``lo``/``hi`` range with its bit
width in the metadata). The metadata also carries the input shape, the per-layer bit widths
and the part of the run's gin configuration that builds the teacher and the quantization
(:mod:`dfqkit.export_config`: nothing that only training used), so :func:`load_quantized`
rebuilds the student without the run directory, the teacher's checkpoint or the data: its
logits equal the fake-quantized student's exactly.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import gin
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dfqkit import config as cfg
from dfqkit.errors import ConfigError
from dfqkit.export_config import student_config
from dfqkit.export_onnx import export_onnx
from dfqkit.ptq import quantize_with
from dfqkit.quant import ActQuantizer, set_quant_mode
from dfqkit.quant.codes import pack_codes, weight_codes
from dfqkit.quant.modules import QuantConv2d, QuantLinear
from dfqkit.rundir import load_run, record_model, recorded_model

FORMAT = "dfqkit.quantized.v1"


class FrozenWeightQuantizer(nn.Module):
    """The weight quantizer of a loaded export: the layer's weight *is* the dequantized value
    ``scale · (q + zero_point)``, so the forward is the identity; :meth:`codes` recovers ``q``."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero_point", zero_point.float())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def codes(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = (w.detach().float() / self.scale - self.zero_point).round()
        return q, self.scale, self.zero_point

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def quantized_tensors(student: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The export's tensors and per-layer description of a (fake-)quantized student.

    Raises:
        ValueError: A layer's codes are not integers of its bit width (nothing is clamped).
    """
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    replaced: set[str] = set()
    for name, module in student.named_modules():
        if isinstance(module, QuantConv2d | QuantLinear):
            q, scale, zero_point = weight_codes(module)
            bits = module.weight_quant.bits
            tensors[f"{name}.weight.codes"] = pack_codes(q, bits, what=f"{name}.weight")
            tensors[f"{name}.weight.scale"] = scale.detach().float().contiguous()
            tensors[f"{name}.weight.zero_point"] = zero_point.detach().float().contiguous()
            layers[name] = {"kind": type(module).__name__, "bits": bits}
            replaced.add(f"{name}.weight")
    for name, value in student.state_dict().items():
        if name in replaced or ".weight_quant." in name:
            continue
        tensors[name] = value.detach().cpu().contiguous()
    for name, module in student.named_modules():
        if isinstance(module, ActQuantizer):
            layers[name] = {"kind": "activation", "bits": module.bits}
    return tensors, layers


def save_quantized(
    student: nn.Module,
    out: Path,
    *,
    operative_config: str,
    input_shape: Sequence[int],
    epochs_done: int = 0,
    checkpoint: str = "",
) -> Path:
    """Write a (fake-)quantized student as a quantized safetensors file.

    Args:
        student: The student, activation ranges observed (frozen or not).
        out: The file to write.
        operative_config: The run's operative gin configuration; only the part that builds
            ``train.teacher`` and ``train.quant`` is stored (:func:`student_config`).
        input_shape: ``(channels, height, width)`` of one input.
        epochs_done: Student epochs trained (informational).
        checkpoint: which checkpoint of the run it is (``"best"``/``"last"``; informational).

    Returns:
        ``out``.
    """
    tensors, layers = quantized_tensors(student.cpu())
    metadata = {
        "format": FORMAT,
        # the student's part of the operative configuration (the key keeps its v1 name)
        "operative_config": student_config(operative_config),
        "input_shape": json.dumps([int(d) for d in input_shape]),
        "layers": json.dumps(layers),
        "epochs_done": str(epochs_done),
        "checkpoint": checkpoint,
    }
    save_file(tensors, str(out), metadata=metadata)
    return Path(out)


def export_safetensors(run_dir: Path, out: Path | None = None, *, which: str | None = None) -> Path:
    """Write ``run_dir``'s student (checkpoint ``which``: ``"best"``, ``"last"``, or ``None``
    for the best when the run kept one) as a quantized safetensors file; the file's metadata
    and the run's ``metrics.json`` record which checkpoint and epoch it holds."""
    run_dir = Path(run_dir)
    run = load_run(run_dir, which=which)
    if not (run_dir / "operative_config.gin").is_file():
        raise ConfigError(f"--run {str(run_dir)!r} has no operative_config.gin")
    image_size, channels = run.data.image_size, run.data.channels
    out = Path(out) if out is not None else run_dir / "student_quantized.safetensors"
    save_quantized(
        run.student_module,
        out,
        operative_config=(run_dir / "operative_config.gin").read_text(),
        input_shape=(channels, image_size, image_size),
        epochs_done=run.loaded[1],
        checkpoint=run.loaded[0],
    )
    record_model(run_dir, out, run.loaded)
    return out


def _build_float_model_and_config():
    teacher_ref = gin.query_parameter("train.teacher")
    with gin.unlock_config():
        gin.bind_parameter(f"{teacher_ref.configurable.name}.weights", None)
    model = copy.deepcopy(teacher_ref)  # gin evaluates a reference when it is deep-copied
    quant = copy.deepcopy(gin.query_parameter("train.quant"))
    try:
        transforms = copy.deepcopy(gin.query_parameter("train.transforms"))
    except ValueError:  # not bound: none
        transforms = []
    return model, quant, transforms


def load_quantized(path: str | Path) -> nn.Module:
    """Rebuild the quantized student of an export (activation ranges frozen, eval mode).

    Clears and reuses gin's global configuration while building (the export's configuration
    is parsed); the caller's gin bindings are not kept. Only the teacher's architecture and
    the quantizers must be importable (a v1 file written before the configuration was reduced
    to them is reduced here too).
    """
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a dfqkit quantized export (format {FORMAT})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg.register_configurables()
    gin.clear_config()
    try:
        gin.parse_config(student_config(meta["operative_config"]))
        model, quant, transforms = _build_float_model_and_config()
    finally:
        gin.clear_config()
    shape = json.loads(meta["input_shape"])
    # the transforms rebuild the student's structure (their values are overwritten below)
    student = quantize_with(model, quant, torch.zeros(2, *shape), transforms)
    layers = json.loads(meta["layers"])
    state = {}
    for name, module in student.named_modules():
        if name in layers and isinstance(module, QuantConv2d | QuantLinear):
            q = tensors.pop(f"{name}.weight.codes").float()
            scale = tensors.pop(f"{name}.weight.scale")
            zero_point = tensors.pop(f"{name}.weight.zero_point")
            state[f"{name}.weight"] = (q + zero_point) * scale  # as the fake quantization
            module.weight_quant = FrozenWeightQuantizer(scale, zero_point, layers[name]["bits"])
    state.update(tensors)
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".weight_quant." not in k]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the rebuilt student: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    set_quant_mode(student, "frozen")
    return student.eval()


def main(argv: Sequence[str] | None = None, *, prog: str = "dfqkit.export") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a run directory")
    parser.add_argument("--format", choices=["safetensors", "onnx"], default="safetensors")
    parser.add_argument("--out", type=Path, default=None, help="output file")
    parser.add_argument(
        "--which",
        choices=["best", "last"],
        default=None,
        help="which checkpoint: best (on validation) or last (default: best when the run kept one)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    try:
        if args.format == "onnx":
            out = export_onnx(args.run, args.out, which=args.which)
        else:
            out = export_safetensors(args.run, args.out, which=args.which)
    except (ConfigError, ValueError, FileNotFoundError, ImportError) as err:
        if args.debug:
            raise
        print(f"{prog}: error: {cfg.one_line(err)}", file=sys.stderr)
        return 2
    held = recorded_model(args.run, out)
    print(f"exported {out}" + (f" ({held})" if held else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
