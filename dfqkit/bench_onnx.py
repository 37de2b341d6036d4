"""File size and onnxruntime CPU latency of an exported QDQ student against its float model.

    python -m dfqkit.bench_onnx --model mnist_resnet8 --w-bits 4 --a-bits 4 [--batch 1 32]
        [--runs 50] [--threads 1] [--zoo] [--json FILE]
    python -m dfqkit.bench_onnx --model resnet18 --w-bits 8 --a-bits 8 --runs 10

Builds the float model (random weights unless ``--zoo``, which loads the zoo's trained MNIST
teacher), exports it to ONNX, quantizes a copy with GDFQ's defaults (``after_relu``,
per-channel min/max weights, EMA activation ranges observed on a few random batches) and
exports that with :func:`dfqkit.export_onnx.export_model_onnx`. Each file is timed in
onnxruntime on the CPU with ``--threads`` intra-op threads: the median wall time of ``--runs``
runs after 3 warm-up runs, per batch size, the sessions taking turns. The QDQ file is timed
twice: with onnxruntime's default session (its integer kernels, the deployment case) and with
its QDQ rewriting off (``session.disable_quant_qdq``, the graph as written). With ``--zoo``
the offline test split also gives each session's top-1 agreement with dfqkit's student.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    import onnxruntime as ort

from dfqkit.data import mnist5k
from dfqkit.export_onnx import export_model_onnx
from dfqkit.models import mnist_resnet
from dfqkit.optional import require
from dfqkit.quant import QuantConfig, quantize_, set_quant_mode

MODELS = ("mnist_resnet8", "resnet18")


def build_float(name: str, *, zoo: bool) -> tuple[nn.Module, tuple[int, int, int]]:
    """The float model and its input shape ``(channels, height, width)``."""
    if name == "mnist_resnet8":
        return mnist_resnet(weights="zoo" if zoo else None).eval(), (1, 28, 28)
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(weights=None).eval(), (3, 224, 224)
    raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {name!r}")


def build_student(model: nn.Module, shape: tuple[int, ...], w_bits: int, a_bits: int) -> nn.Module:
    """GDFQ's student of ``model`` with activation ranges observed on 4 random batches."""
    config = QuantConfig(w_bits=w_bits, a_bits=a_bits)
    student = quantize_(copy.deepcopy(model), config, torch.zeros(2, *shape))
    set_quant_mode(student, "observe")
    with torch.no_grad():
        for _ in range(4):
            student(torch.randn(8, *shape))
    set_quant_mode(student, "frozen")
    return student.eval()


def export_float(model: nn.Module, example: torch.Tensor, out: Path) -> Path:
    """The float model as ONNX (opset 17; the exporter folds its batch norms)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated in torch 2.9+
        torch.onnx.export(
            model,
            (example,),
            str(out),
            dynamo=False,
            opset_version=17,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )
    return out


def _onnxruntime():
    return require("onnxruntime", extra="onnx", purpose="the ONNX benchmark")


def session(path: Path, threads: int, *, qdq_rewrites: bool = True) -> ort.InferenceSession:
    ort = _onnxruntime()
    """A CPU session with ``threads`` intra-op threads (and one inter-op thread)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not qdq_rewrites:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency_ms(
    sessions: Sequence[ort.InferenceSession], batch: np.ndarray, runs: int
) -> list[float]:
    """Median wall time (ms) of each session over ``runs`` runs after 3 warm-up runs.

    The sessions take turns within every run, so a load change on a shared machine hits them
    alike instead of biasing whichever ran during it.
    """
    for sess in sessions:
        for _ in range(3):
            sess.run(None, {"images": batch})
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, sess in enumerate(sessions):
            start = time.perf_counter()
            sess.run(None, {"images": batch})
            times[i].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def agreement(sess: ort.InferenceSession, student: nn.Module) -> float:
    """Top-1 agreement (%) with the fake-quantized student on the offline test split."""
    agree = total = 0
    for images, _ in mnist5k().loader("test", 256):
        with torch.no_grad():
            want = student(images).argmax(1)
        got = torch.from_numpy(sess.run(None, {"images": images.numpy()})[0]).argmax(1)
        agree += (got == want).sum().item()
        total += len(images)
    return 100.0 * agree / total


def bench(
    name: str,
    *,
    w_bits: int,
    a_bits: int,
    batches: Sequence[int],
    runs: int,
    threads: int,
    zoo: bool,
) -> list[dict[str, Any]]:
    """One row per file and session: size (KB) and median latency (ms) per batch size."""
    torch.manual_seed(0)
    model, shape = build_float(name, zoo=zoo)
    student = build_student(model, shape, w_bits, a_bits)
    with tempfile.TemporaryDirectory() as tmp:
        float_path = export_float(model, torch.zeros(1, *shape), Path(tmp) / "float.onnx")
        qdq_path = export_model_onnx(student, torch.zeros(1, *shape), Path(tmp) / "qdq.onnx")
        sessions = {
            "float": (float_path, session(float_path, threads)),
            f"W{w_bits}A{a_bits} QDQ, default session": (qdq_path, session(qdq_path, threads)),
            f"W{w_bits}A{a_bits} QDQ, disable_quant_qdq": (
                qdq_path,
                session(qdq_path, threads, qdq_rewrites=False),
            ),
        }
        rows = [
            {"model": name, "file": label, "size_kb": round(path.stat().st_size / 1024, 1)}
            for label, (path, _) in sessions.items()
        ]
        rng = np.random.default_rng(0)
        for b in batches:
            batch = rng.standard_normal((b, *shape)).astype(np.float32)
            medians = latency_ms([sess for _, sess in sessions.values()], batch, runs)
            for row, ms in zip(rows, medians):
                row[f"batch{b}_ms"] = round(ms, 2)
        if zoo and name == "mnist_resnet8":
            for row, (_, sess) in list(zip(rows, sessions.values()))[1:]:
                row["top1_agreement"] = round(agreement(sess, student), 2)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dfqkit.bench_onnx", description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=MODELS, required=True)
    parser.add_argument("--w-bits", type=int, default=4)
    parser.add_argument("--a-bits", type=int, default=4)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--runs", type=int, default=50, help="timed runs per measurement")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--zoo", action="store_true", help="the zoo's trained MNIST teacher")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = bench(
        args.model,
        w_bits=args.w_bits,
        a_bits=args.a_bits,
        batches=args.batch,
        runs=args.runs,
        threads=args.threads,
        zoo=args.zoo,
    )
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print(f"onnxruntime {_onnxruntime().__version__}, {args.threads} thread(s)")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "–")) for k in keys) + " |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
