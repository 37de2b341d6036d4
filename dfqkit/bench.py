"""Method tables and speed figures.

    python -m dfqkit.bench accuracy --gin R1.gin R2.gin ... --seeds 0 1 2 --out DIR [--jobs N]
    python -m dfqkit.bench speed --gin R.gin [--batch N] [--threads T] [--iters N] [--json FILE]
                                 [--channels_last] [--compile] [--tune_malloc]
    python -m dfqkit.bench calibration --gin R.gin [--batches N] [--scales F ...] [--json FILE]

``accuracy`` runs every recipe for every seed (each run in its own process, resumed if a
checkpoint exists, skipped if its ``metrics.json`` exists) and writes ``DIR/results.md`` (mean ±
std of test top-1 over seeds, with the teacher and naive rows), ``DIR/results.json`` and
``DIR/results.png``. ``speed`` times the recipe's training step on randomly initialised weights
and synthetic inputs (no data, no checkpoint) and reports the median ms per iteration of the
generator step, the student step and both, images per second and the peak memory, and the median
process CPU time per iteration (steadier than wall time on a machine shared with other jobs).
The ``--warmup`` iterations are calibration iterations (ranges observed, no student step), timed
apart with the peak memory when they end (``ms_calibration_iter``, ``peak_rss_calibration_mb``).
``--reference gdfq`` times the official GDFQ iteration re-created on the same machine, both of
its phases (:mod:`dfqkit.bench_reference`); where the official code itself was measured for the
recipe, batch and thread count (:mod:`dfqkit.bench_official`), the result also carries that
figure and the speed-up against it, with the machine it was measured on.
``--channels_last`` puts teacher, student and generator in ``channels_last`` memory format and
``--compile`` wraps teacher and student in ``torch.compile`` (both change the floating-point
summation order, so results are not bit-identical to the default layout; measured options).
``--tune_malloc`` keeps freed memory for reuse (:mod:`dfqkit.allocator`; numerically neutral).
``calibration`` asks how much a recipe's untrained quantized student depends on where its
activation ranges come from: it observes them on Gaussian noise (the naive reference), on real
training images (a real-data reference, not DFQ) and, with ``--run DIR``, on that run's
generator, evaluates each on the test split, and repeats with every range's upper bound scaled
by each ``--scales`` factor.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gin
import torch

from dfqkit import allocator
from dfqkit import config as cfg
from dfqkit.bench_official import compare as compare_official
from dfqkit.bench_reference import peak_rss_mb, reference_iteration
from dfqkit.build import build_run
from dfqkit.engine import Phase
from dfqkit.evaluate import evaluate
from dfqkit.generators.base import synthesize
from dfqkit.optional import require
from dfqkit.phases import noise_batch
from dfqkit.quant import act_quantizers, set_quant_mode
from dfqkit.run import Run
from dfqkit.rundir import load_run

SPEED_BINDINGS = (
    "TEACHER_WEIGHTS = None",
    "DATA_ROOT = None",
    "train.data = @data.synthetic()",
    "data.synthetic.num_classes = %NUM_CLASSES",
    "data.synthetic.image_size = %IMAGE_SIZE",
    "data.synthetic.channels = %CHANNELS",
)


def speed(
    gin_files: Sequence[str],
    *,
    batch: int | None,
    threads: int | None,
    iters: int,
    warmup: int,
    params: Sequence[str] = (),
    reference: str | None = None,
    channels_last: bool = False,
    compile: bool = False,
    tune_malloc: bool = False,
) -> dict[str, Any]:
    """Time the recipe's steady-state training iteration (built by the gin root like any run,
    on random weights and synthetic data); returns the figures.

    With ``reference="gdfq"``, time instead the official GDFQ iteration re-created by
    :mod:`dfqkit.bench_reference` on the recipe's teacher, batch and bit widths (run it in its
    own process, beside a run without it, so peak memory compares too).
    """
    if reference not in (None, "gdfq"):
        raise cfg.ConfigError(f"--reference must be 'gdfq', got {reference!r}")
    if threads:
        torch.set_num_threads(threads)
    malloc_tuned = allocator.tune_malloc() if tune_malloc else False
    bindings = list(SPEED_BINDINGS) + list(params)
    if batch:
        bindings.append(f"BATCH_SIZE = {batch}")
    cfg.parse(gin_files, bindings)
    torch.manual_seed(0)
    bs = gin.query_parameter("%BATCH_SIZE")
    timing: dict[str, float] = {}
    if reference == "gdfq":
        teacher = gin.query_parameter("train.teacher").scoped_configurable_fn()
        macros = {
            m: gin.query_parameter(f"%{m}")
            for m in ("NUM_CLASSES", "IMAGE_SIZE", "CHANNELS", "W_BITS", "A_BITS")
        }
        timing.update(
            reference_iteration(
                teacher,
                num_classes=macros["NUM_CLASSES"],
                image_size=macros["IMAGE_SIZE"],
                channels=macros["CHANNELS"],
                batch_size=bs,
                w_bits=macros["W_BITS"],
                a_bits=macros["A_BITS"],
                iters=iters,
                warmup=warmup,
            )
        )
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run = build_run(output_dir=tmp, for_training=False)
            if channels_last:
                channels_last_(run)
            if compile:
                compile_(run)
            cpu: list[float] = []
            calib: dict[str, float] = {}
            marks = time_iterations(run, warmup=warmup, iterations=iters, cpu=cpu, calib=calib)
        timing.update(calib)
        triples = [marks[i : i + 3] for i in range(0, len(marks), 3)]
        timing["cpu_ms_per_iter"] = 1000 * statistics.median(cpu)
        timing["ms_generator_step"] = 1000 * statistics.median(b - a for a, b, _ in triples)
        timing["ms_student_step"] = 1000 * statistics.median(c - b for _, b, c in triples)
        timing["ms_per_iter"] = 1000 * statistics.median(c - a for a, _, c in triples)
    ms = timing["ms_per_iter"]
    out = {
        "recipe": cfg.recipe_name(cfg.resolve_gin_file(gin_files[0])),
        "implementation": f"reference:{reference}" if reference else "dfqkit",
        "channels_last": channels_last,
        "compile": compile,
        "malloc_tuned": malloc_tuned,
        "batch_size": bs,
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "iterations": iters,
        **timing,
        "img_per_s": 1000 * bs / ms,
        "peak_rss_mb": peak_rss_mb(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out.update(compare_official(out) or {})
    return out


def channels_last_(run: Run) -> None:
    """Teacher, student and generator in ``channels_last`` memory format (in place)."""
    for module in (run.teacher, run.student_module, run.generator):
        module.to(memory_format=torch.channels_last)


def compile_(run: Run) -> None:
    """``torch.compile`` on teacher and student, in place (the engine keeps its references)."""
    for module in (run.teacher, run.student_module):
        module.compile()


def time_iterations(
    run: Run,
    *,
    warmup: int,
    iterations: int,
    cpu: list[float] | None = None,
    calib: dict[str, float] | None = None,
) -> list[float]:
    """Time ``iterations`` steady-state iterations of ``run`` (generator and student step, ranges
    frozen) after ``warmup`` calibration iterations (generator step, ranges observed, no student
    step: a calibration epoch's iteration); returns three timestamps per iteration: start, end
    of the generator step, end of the student step. With ``cpu`` (a list), also appends each
    iteration's process CPU time in seconds. With ``calib`` (a dict), also stores the median
    milliseconds of the calibrating iterations (``ms_calibration_iter``) and the process's peak
    RSS when they end (``peak_rss_calibration_mb``)."""
    set_quant_mode(run.student, "observe")
    times = []
    for _ in range(warmup):
        start = time.perf_counter()
        run.engine.iteration(Phase(generator=True, observe=True, student=False), 0)
        times.append(time.perf_counter() - start)
    if calib is not None and times:
        calib["ms_calibration_iter"] = 1000 * statistics.median(times)
        calib["peak_rss_calibration_mb"] = peak_rss_mb()
    set_quant_mode(run.student, "frozen")
    marks: list[float] = []
    for _ in range(iterations):
        start = time.process_time()
        run.engine.iteration(Phase(generator=True, observe=False, student=True), 0, marks)
        if cpu is not None:
            cpu.append(time.process_time() - start)
    run.engine.pop_loss_means()
    return marks


def _run_one(recipe: str, seed: int, out: Path, params: Sequence[str], threads: int | None):
    """Start (or resume) one training run in a subprocess; returns the Popen or None if done."""
    run_dir = out / "runs" / cfg.run_name(cfg.resolve_gin_file(recipe)) / f"seed{seed}"
    if (run_dir / "metrics.json").is_file():
        return run_dir, None
    cmd = [
        sys.executable,
        "-m",
        "dfqkit.train",
        "--gin",
        recipe,
        "--gin_param",
        f"SEED = {seed}",
        "--output_dir",
        str(run_dir),
    ]
    for p in params:
        cmd += ["--gin_param", p]
    if (run_dir / "checkpoints").is_dir():
        cmd.append("--resume")
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "train.log", "a")  # noqa: SIM115 (closed when the process ends)
    return run_dir, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def accuracy(
    recipes: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    *,
    jobs: int = 1,
    params: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Run every recipe × seed (``jobs`` at a time) and aggregate the metrics."""
    out.mkdir(parents=True, exist_ok=True)
    todo = [(r, s) for r in recipes for s in seeds]
    running: list = []
    failed = []
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    while todo or running:
        while todo and len(running) < jobs:
            recipe, seed = todo.pop(0)
            run_dir, proc = _run_one(recipe, seed, out, params, threads)
            if proc is not None:
                running.append((recipe, seed, run_dir, proc))
        for item in list(running):
            if item[3].poll() is not None:
                running.remove(item)
                if item[3].returncode != 0:
                    failed.append(f"{item[0]} seed {item[1]} (see {item[2] / 'train.log'})")
        if running:
            time.sleep(1.0)
    if failed:
        raise RuntimeError("runs failed: " + "; ".join(failed))
    rows = aggregate(recipes, seeds, out)
    warning = teachers_differ(rows)
    if warning:
        print(warning, file=sys.stderr)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "results.md").write_text(markdown_table(rows))
    plot(rows, out / "results.png")
    return rows


def _stats(values: list[float]) -> dict[str, float]:
    """Mean and sample std; NaN (a figure a run does not have) when any value is NaN."""
    if any(math.isnan(v) for v in values):
        return {"mean": math.nan, "std": math.nan, "values": values}
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "values": values}


def aggregate(recipes: Sequence[str], seeds: Sequence[int], out: Path) -> list[dict[str, Any]]:
    rows = []
    for recipe in recipes:
        name = cfg.run_name(cfg.resolve_gin_file(recipe))
        ms = [
            json.loads((out / "runs" / name / f"seed{s}" / "metrics.json").read_text())
            for s in seeds
        ]
        rows.append(
            {
                "recipe": ms[0]["recipe"],
                "w_bits": ms[0]["w_bits"],
                "a_bits": ms[0]["a_bits"],
                "seeds": list(seeds),
                "teacher": _stats([m["teacher"]["test_top1"] for m in ms]),
                "naive": _stats([m["naive"]["test_top1"] for m in ms]),
                "calibrated": _stats(
                    [(m.get("calibrated") or {}).get("test_top1", math.nan) for m in ms]
                ),
                "best": _stats([m["best"]["test_top1"] for m in ms]),
                "last": _stats([m["last"]["test_top1"] for m in ms]),
                "last5": _stats([m["last5"]["test_top1"] for m in ms]),
                "ms_per_iter": statistics.fmean(m["ms_per_iter"] for m in ms),
            }
        )
    return rows


def teachers_differ(rows: list[dict[str, Any]]) -> str | None:
    """A warning when the table's runs did not all use one teacher (its test top-1 differs),
    else ``None``: such figures are not comparable (docs/results.md, "Offline teacher")."""
    values = sorted({v for r in rows for v in r["teacher"]["values"]})
    if len(values) <= 1:
        return None
    return (
        "WARNING: these runs used different teachers (test top-1 "
        + ", ".join(f"{v:.2f}" for v in values)
        + "); their figures are not comparable"
    )


def markdown_table(rows: list[dict[str, Any]]) -> str:
    def f(s: dict[str, float]) -> str:
        return "–" if math.isnan(s["mean"]) else f"{s['mean']:.2f} ± {s['std']:.2f}"

    lines = [
        "| recipe | W/A | teacher | naive | calibrated | best-val epoch → test | last "
        "| mean of last 5 | ms/iter | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | W{r['w_bits']}A{r['a_bits']} | {r['teacher']['mean']:.2f} | "
            f"{f(r['naive'])} | {f(r['calibrated'])} | {f(r['best'])} | {f(r['last'])} | "
            f"{f(r['last5'])} | {r['ms_per_iter']:.1f} | {len(r['seeds'])} |"
        )
    warning = teachers_differ(rows)
    return (f"{warning}\n\n" if warning else "") + "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    matplotlib = require("matplotlib", extra="plots", purpose="the results plot")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", extra="plots", purpose="the results plot")

    labels = [f"{Path(r['recipe']).stem}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
    width = 0.27
    for i, key in enumerate(("naive", "best", "last")):
        ax.bar(
            [xi + (i - 1) * width for xi in x],
            [r[key]["mean"] for r in rows],
            width,
            yerr=[r[key]["std"] for r in rows],
            capsize=3,
            label=key,
        )
    ax.axhline(
        statistics.fmean(r["teacher"]["mean"] for r in rows),
        color="k",
        ls="--",
        lw=1,
        label="teacher",
    )
    ax.set_xticks(list(x), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test top-1 (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def calibration(
    recipes: Sequence[str],
    *,
    batches: int = 200,
    scales: Sequence[float] = (),
    run_dir: Path | None = None,
    params: Sequence[str] = (),
) -> dict[str, Any]:
    """Test top-1 of the recipe's quantized student, untrained, per source of its ranges.

    Returns ``{"teacher": top1, "sources": {name: {"top1", "hi": [per quantizer],
    "scaled": {factor: top1}}}}``; sources ``noise``, ``real`` (the train split, when the
    dataset has one) and ``generator`` (with ``run_dir``: its newest checkpoint).
    """
    if run_dir is not None:
        run = load_run(run_dir, which="last")
    else:
        cfg.parse(recipes, params)
        torch.manual_seed(cfg.macro_value("SEED", 0))
        with tempfile.TemporaryDirectory() as tmp:
            run = build_run(output_dir=tmp, for_training=False)
    batch_size, seed = run.schedule.batch_size, run.schedule.seed
    teacher, data, device = run.teacher, run.data, run.device
    student = run.student_module
    test = data.loader("test", 256)

    def source_batches(name: str):
        torch.manual_seed(seed)
        if name == "noise":
            for _ in range(batches):
                yield noise_batch(data, batch_size, device)
        elif name == "real":
            train_set = data.split("train")
            gen = torch.Generator().manual_seed(seed)
            for _ in range(batches):
                idx = torch.randint(len(train_set), (batch_size,), generator=gen).tolist()
                yield torch.stack([train_set[i][0] for i in idx]).to(device)
        else:
            generator, mixer = run.generator, run.mixer
            generator.train()
            for _ in range(batches):
                yield synthesize(generator, mixer, batch_size, device).images

    sources = ["noise"] + (["real"] if data.train is not None else [])
    sources += ["generator"] if run_dir is not None else []
    out: dict[str, Any] = {
        "teacher": evaluate(teacher, test, device=device)["top1"],
        "batches": batches,
        "sources": {},
    }
    for name in sources:
        model = copy.deepcopy(student)
        for q in act_quantizers(model):  # start every source from empty observers
            q.load_state_dict(type(q)(bits=q.bits).state_dict(), strict=False)
            q._updates = 0
        set_quant_mode(model, "observe")
        with torch.no_grad():
            for x in source_batches(name):
                model(x)
        set_quant_mode(model, "frozen")
        quantizers = act_quantizers(model)
        his = [q.hi.detach().clone() for q in quantizers]
        row = {
            "top1": evaluate(model, test, device=device)["top1"],
            "hi": [float(h) for h in his],
            "scaled": {},
        }
        with torch.no_grad():
            for factor in scales:
                for q, h in zip(quantizers, his, strict=True):
                    q.hi.copy_(h * factor)
                row["scaled"][str(factor)] = evaluate(model, test, device=device)["top1"]
            for q, h in zip(quantizers, his, strict=True):
                q.hi.copy_(h)
        out["sources"][name] = row
    return out


def main(argv: Sequence[str] | None = None, *, prog: str = "dfqkit.bench") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accuracy", help="run recipes × seeds and tabulate test top-1")
    acc.add_argument("--gin", nargs="+", required=True, help="recipes")
    acc.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    acc.add_argument("--out", required=True, type=Path)
    acc.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    acc.add_argument("--gin_param", action="append", default=[])
    spd = sub.add_parser("speed", help="time the training step on random weights")
    spd.add_argument("--gin", action="append", required=True)
    spd.add_argument("--batch", type=int, default=None)
    spd.add_argument("--threads", type=int, default=None)
    spd.add_argument("--iters", type=int, default=10)
    spd.add_argument("--warmup", type=int, default=2)
    spd.add_argument("--json", type=Path, default=None)
    spd.add_argument(
        "--reference",
        choices=["gdfq"],
        default=None,
        help="time the official GDFQ iteration (re-created) instead of dfqkit's",
    )
    spd.add_argument(
        "--channels_last",
        action="store_true",
        help="teacher, student and generator in channels_last (not bit-identical)",
    )
    spd.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile teacher and student (not bit-identical)",
    )
    spd.add_argument(
        "--tune_malloc",
        action="store_true",
        help="keep freed memory for reuse (glibc; fewer page faults, same numbers)",
    )
    spd.add_argument("--gin_param", action="append", default=[])
    cal = sub.add_parser("calibration", help="untrained accuracy per source of activation ranges")
    cal.add_argument("--gin", action="append", default=[])
    cal.add_argument("--run", type=Path, default=None, help="also use this run's generator")
    cal.add_argument("--batches", type=int, default=200)
    cal.add_argument("--scales", nargs="*", type=float, default=[])
    cal.add_argument("--json", type=Path, default=None)
    cal.add_argument("--gin_param", action="append", default=[])
    args = parser.parse_args(argv)
    if args.command == "calibration":
        if not args.gin and args.run is None:
            parser.error("calibration needs --gin RECIPE or --run DIR")
        try:
            res = calibration(
                args.gin,
                batches=args.batches,
                scales=args.scales,
                run_dir=args.run,
                params=args.gin_param,
            )
        except cfg.ConfigError as err:
            print(f"{prog}: error: {cfg.one_line(err)}", file=sys.stderr)
            return 2
        print(f"teacher {res['teacher']:.2f}")
        for name, row in res["sources"].items():
            scaled = " ".join(f"×{f}: {v:.2f}" for f, v in row["scaled"].items())
            his = " ".join(f"{h:.2f}" for h in row["hi"])
            print(f"{name:9s} {row['top1']:6.2f}  hi [{his}]  {scaled}")
        if args.json:
            args.json.write_text(json.dumps(res, indent=2) + "\n")
        return 0
    if args.command == "accuracy":
        rows = accuracy(args.gin, args.seeds, args.out, jobs=args.jobs, params=args.gin_param)
        print(markdown_table(rows), end="")
        return 0
    try:
        res = speed(
            args.gin,
            batch=args.batch,
            threads=args.threads,
            iters=args.iters,
            warmup=args.warmup,
            params=args.gin_param,
            reference=args.reference,
            channels_last=args.channels_last,
            compile=args.compile,
            tune_malloc=args.tune_malloc,
        )
    except cfg.ConfigError as err:
        print(f"{prog}: error: {cfg.one_line(err)}", file=sys.stderr)
        return 2
    layout = "".join(f", {name}" for name in ("channels_last", "compile") if res.get(name))
    cpu = f" ({res['cpu_ms_per_iter']:.1f} ms CPU)" if "cpu_ms_per_iter" in res else ""
    steps = (
        f"generator step {res['ms_generator_step']:.1f} ms, student step "
        f"{res['ms_student_step']:.1f} ms, "
        if "ms_generator_step" in res
        else ""
    )
    print(
        f"{res['recipe']} [{res['implementation']}{layout}]: batch {res['batch_size']}, "
        f"{res['threads']} thread(s), {res['device']}: {steps}total {res['ms_per_iter']:.1f} "
        f"ms/iter{cpu}, {res['img_per_s']:.1f} img/s, peak RSS {res['peak_rss_mb']:.0f} MB"
    )
    if "ms_calibration_iter" in res:
        print(
            f"  calibration phase: {res['ms_calibration_iter']:.1f} ms/iter, peak RSS "
            f"{res['peak_rss_calibration_mb']:.0f} MB when it ends"
        )
    if "official" in res:
        off = res["official"]
        print(
            f"  vs the official code: {off['ms_per_iter']:.0f} ms/iter ({off['code']}; "
            f"{off['machine']}) -> {res['speedup_vs_official']:.2f}x; comparable only on that "
            "machine, quiet"
        )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
