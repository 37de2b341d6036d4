"""The GPU check: throughput and memory of the training step per precision mode, and whether
bf16 autocast computes what fp32 computes.

    python -m dfqkit.bench_gpu [--out DIR] [--budget_s 480]
        [--recipes R ...] [--modes fp32 bf16 bf16_cl bf16_compile] [--batch N]

For each recipe (default: GDFQ and the paper's method on ResNet-18 ImageNet, and
``recipes/deit_w4a8.gin``) and each mode it builds the run on random weights and synthetic
inputs (as ``dfqkit bench speed`` does), times the generator + student step, and reports images
per second and the peak device memory:

* ``fp32``: no autocast; ``bf16``: Accelerate's bf16 autocast (fake quantization stays fp32);
* ``bf16_cl``: bf16 with teacher, student and generator in ``channels_last``;
* ``bf16_compile``: bf16 + channels_last with ``torch.compile`` on teacher and student (where it
  compiles; a failure is reported, not fatal).

Then the bf16 check, per recipe: the same run built twice (same seed), ``--check_iters``
iterations in fp32 and in bf16 from the same state and the same draws; every loss must be
finite and every activation quantizer must return fp32 under autocast. Comparisons on 64 fixed
probe images: (1) the float teacher under bf16 autocast against itself in fp32 (bf16 arithmetic
alone), relative L2 of the logits ≤ ``--tolerance``; (2) the fp32 run's student under autocast
against itself in fp32 (the same quantizer state) and (3) the students of the two runs (the
ranges each observed on its own images, then trained): top-1 agreement ≥ ``--min_agreement``
each — at 4 bits a bf16 rounding moves an activation across a code boundary now and then, and
a moved code changes a logit by a whole step, so logits are compared by agreement there.
Modes that would not fit the time budget are skipped and listed. Everything runs on the CPU too
(slowly), which the tests use on tiny recipes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dfqkit import config as cfg
from dfqkit.bench import SPEED_BINDINGS, channels_last_, compile_, time_iterations
from dfqkit.build import build_run
from dfqkit.engine import Phase
from dfqkit.quant import act_quantizers, set_quant_mode
from dfqkit.run import Run

RECIPES = (
    "recipes/gdfq/resnet18_imagenet_w4a4.gin",
    "recipes/diversity/resnet18_imagenet_w4a4.gin",
    "recipes/deit_w4a8.gin",
)
MODES = {  # mixed precision, channels_last, torch.compile
    "fp32": ("no", False, False),
    "bf16": ("bf16", False, False),
    "bf16_cl": ("bf16", True, False),
    "bf16_compile": ("bf16", True, True),
}


def build(recipe: str, *, mixed: str, batch: int | None, params: Sequence[str], tmp: str) -> Run:
    """The recipe's run on random weights and synthetic data, at ``mixed`` precision."""
    bindings = [*SPEED_BINDINGS, f"train.mixed_precision = {mixed!r}", *params]
    if batch:
        bindings.append(f"BATCH_SIZE = {batch}")
    cfg.parse([recipe], bindings)
    torch.manual_seed(0)
    return build_run(output_dir=tmp, for_training=False)


_channels_last = channels_last_
_compile = compile_  # (a module attribute, so tests can replace it)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run: Run, *, warmup: int, iters: int) -> dict[str, float]:
    """Median step times (ms), images per second and peak device memory (MiB; CUDA only)."""
    device = run.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    marks = time_iterations(run, warmup=warmup, iterations=iters)
    _sync(device)
    triples = [marks[i : i + 3] for i in range(0, len(marks), 3)]
    ms = 1000 * statistics.median(c - a for a, _, c in triples)
    out = {
        "ms_generator_step": 1000 * statistics.median(b - a for a, b, _ in triples),
        "ms_student_step": 1000 * statistics.median(c - b for _, b, c in triples),
        "ms_per_iter": ms,
        "img_per_s": 1000 * run.schedule.batch_size / ms,
    }
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _iterate(run: Run, iters: int) -> tuple[list[dict[str, float]], set[torch.dtype]]:
    """``iters`` calibrating-and-training iterations from seed 1; the loss means of each and
    the dtypes the activation quantizers returned."""
    dtypes: set[torch.dtype] = set()
    hooks = [
        q.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
        for q in act_quantizers(run.student_module)
    ]
    torch.manual_seed(1)
    losses = []
    set_quant_mode(run.student, "observe")
    for i in range(iters):
        if i == 1:
            set_quant_mode(run.student, "frozen")
        run.engine.iteration(Phase(generator=True, observe=i == 0, student=True), 0)
        losses.append(run.engine.pop_loss_means())
    for h in hooks:
        h.remove()
    return losses, dtypes


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(1) == b.argmax(1)).float().mean().item()


def bf16_check(
    recipe: str,
    *,
    batch: int | None,
    params: Sequence[str],
    iters: int,
    tolerance: float,
    min_agreement: float,
) -> dict[str, Any]:
    """fp32 and bf16 runs of ``recipe`` from the same state and draws (see the module doc)."""
    logits, report, forward, teacher = {}, {}, None, None
    for mixed in ("no", "bf16"):
        with tempfile.TemporaryDirectory() as tmp:
            run = build(recipe, mixed=mixed, batch=batch, params=params, tmp=tmp)
            losses, dtypes = _iterate(run, iters)
            shape = (64, run.data.channels, run.data.image_size, run.data.image_size)
            probe = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(run.device)
            student = run.student_module.eval()
            with torch.no_grad():
                logits[mixed] = student(probe).float().cpu()
                if mixed == "no":  # the same states under bf16 autocast
                    float_logits = run.teacher(probe).float().cpu()
                    with torch.autocast(run.device.type, dtype=torch.bfloat16):
                        teacher = _relative(run.teacher(probe).float().cpu(), float_logits)
                        forward = _agreement(student(probe).float().cpu(), logits["no"])
        finite = all(v == v and abs(v) != float("inf") for step in losses for v in step.values())
        report[mixed] = {"losses_finite": finite, "quantizer_dtypes": sorted(map(str, dtypes))}
    agree = _agreement(logits["bf16"], logits["no"])
    ok = (
        all(r["losses_finite"] for r in report.values())
        and report["bf16"]["quantizer_dtypes"] == ["torch.float32"]
        and teacher <= tolerance
        and min(forward, agree) >= min_agreement
    )
    return {
        "ok": ok,
        "teacher_relative_l2": teacher,
        "student_forward_agreement": forward,
        "runs_relative_l2": _relative(logits["bf16"], logits["no"]),
        "runs_agreement": agree,
        **report,
    }


def check(
    recipes: Sequence[str],
    *,
    modes: Sequence[str],
    batch: int | None = None,
    params: Sequence[str] = (),
    warmup: int = 3,
    iters: int = 10,
    check_iters: int = 3,
    tolerance: float = 0.05,
    min_agreement: float = 0.9,
    budget_s: float = 480.0,
) -> dict[str, Any]:
    """Every recipe × mode measured (within ``budget_s``), then the bf16 check per recipe."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise cfg.ConfigError(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    start, rows, skipped, failed = time.perf_counter(), [], [], []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for recipe in recipes:
        for mode in modes:
            if time.perf_counter() - start > budget_s:
                skipped.append(f"{recipe} {mode}")
                continue
            mixed, channels_last, compiled = MODES[mode]
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    run = build(recipe, mixed=mixed, batch=batch, params=params, tmp=tmp)
                    if channels_last:
                        _channels_last(run)
                    if compiled:
                        _compile(run)
                    rows.append(
                        {"recipe": recipe, "mode": mode, **measure(run, warmup=warmup, iters=iters)}
                    )
            except Exception as err:  # a mode that does not run here is reported, not fatal
                failed.append({"recipe": recipe, "mode": mode, "error": cfg.one_line(err)})
    checks = {}
    for recipe in recipes:
        if time.perf_counter() - start > budget_s:
            skipped.append(f"{recipe} bf16 check")
            continue
        checks[recipe] = bf16_check(
            recipe,
            batch=batch,
            params=params,
            iters=check_iters,
            tolerance=tolerance,
            min_agreement=min_agreement,
        )
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {
        "device": name,
        "torch": torch.__version__,
        "rows": rows,
        "failed": failed,
        "skipped": skipped,
        "bf16_checks": checks,
        "seconds": time.perf_counter() - start,
    }


def table(result: dict[str, Any]) -> str:
    """The measurements as Markdown, with each mode's speed-up over fp32."""
    fp32 = {r["recipe"]: r["ms_per_iter"] for r in result["rows"] if r["mode"] == "fp32"}
    lines = [
        f"device: {result['device']}, torch {result['torch']}",
        "",
        "| recipe | mode | ms/iter | img/s | × fp32 | peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        speed = fp32.get(r["recipe"], float("nan")) / r["ms_per_iter"]
        lines.append(
            f"| {r['recipe']} | {r['mode']} | {r['ms_per_iter']:.1f} | {r['img_per_s']:.1f} | "
            f"{speed:.2f} | {r.get('peak_mib', float('nan')):.0f} |"
        )
    for f in result["failed"]:
        lines.append(f"| {f['recipe']} | {f['mode']} | failed: {f['error'][:80]} | | | |")
    for recipe, c in result["bf16_checks"].items():
        lines.append(
            f"\nbf16 check {recipe}: {'ok' if c['ok'] else 'FAILED'} (teacher under autocast: "
            f"relative L2 {c['teacher_relative_l2']:.4f}; student, same state: top-1 agreement "
            f"{c['student_forward_agreement']:.3f}; the two runs' students: agreement "
            f"{c['runs_agreement']:.3f}, relative L2 {c['runs_relative_l2']:.4f}; quantizers "
            f"return {c['bf16']['quantizer_dtypes']}, losses finite "
            f"{c['no']['losses_finite'] and c['bf16']['losses_finite']})"
        )
    if result["skipped"]:
        lines.append(f"\nskipped (time budget): {', '.join(result['skipped'])}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None, *, prog: str = "dfqkit.bench_gpu") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--batch", type=int, default=None, help="default: each recipe's")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--check_iters", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.02, help="teacher logits, rel. L2")
    parser.add_argument("--min_agreement", type=float, default=0.9)
    parser.add_argument("--budget_s", type=float, default=480.0, help="stop starting new modes")
    parser.add_argument("--gin_param", action="append", default=[])
    parser.add_argument("--out", type=Path, default=None, help="write result.json and table.md")
    args = parser.parse_args(argv)
    try:
        result = check(
            args.recipes,
            modes=args.modes,
            batch=args.batch,
            params=args.gin_param,
            warmup=args.warmup,
            iters=args.iters,
            check_iters=args.check_iters,
            tolerance=args.tolerance,
            min_agreement=args.min_agreement,
            budget_s=args.budget_s,
        )
    except cfg.ConfigError as err:
        print(f"{prog}: error: {cfg.one_line(err)}", file=sys.stderr)
        return 2
    text = table(result)
    print(text, end="")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "table.md").write_text(text)
    return 0 if all(c["ok"] for c in result["bf16_checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
