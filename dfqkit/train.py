"""The training loop over a built :class:`~dfqkit.run.Run`, and the command line.

    python -m dfqkit.train --gin recipes/mnist/gdfq_w4a4.gin [--gin FILE ...]
        [--gin_param "KEY = VALUE" ...] [--output_dir DIR] [--resume] [--debug]
    python -m dfqkit.train --resume --output_dir RUN      # continue RUN from its own config

identical under ``accelerate launch -m dfqkit.train ...`` and as ``dfqkit train ...``.

One epoch: set the learning rates; ``iters_per_epoch`` engine iterations (generator step, then
the student step or an observing forward, as the :class:`~dfqkit.phases.Calibration` and the
warm-up say); merge observed ranges across processes; read the epoch's loss means and skipped
steps (one host sync); evaluate the student on val and test; checkpoint, and keep the
checkpoint as ``best`` when validation improved. After the last epoch, a post-training
reconstruction stage runs if the run has one.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from dfqkit import checkpoint as ckpt
from dfqkit import config as cfg
from dfqkit import rundir
from dfqkit.checks import check_launch
from dfqkit.engine import Phase
from dfqkit.errors import ConfigError, NonFiniteLossError, RunInterrupted, SetupError
from dfqkit.phases import noise_batch
from dfqkit.ptq import quantize_with
from dfqkit.quant import float_layers, set_quant_mode, sync_quantizers
from dfqkit.recipes import describe as describe_recipe
from dfqkit.report import (
    epoch_line,
    epoch_record,
    headline,
    interrupted_message,
    process_report,
    record_scalars,
    save_media,
    summarize,
    summary_line,
)
from dfqkit.run import Run

logger = get_logger(__name__)


def run(
    gin_files: Sequence[str | Path],
    gin_params: Sequence[str] = (),
    *,
    output_dir: str | Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Parse a configuration, build its :class:`Run` and train it; returns the metrics (also
    in ``metrics.json``). What the CLI, the accuracy bench and tests call.

    With ``resume``, the run in ``output_dir`` continues from its own ``config.gin`` (a recipe
    or bindings given may change only :data:`dfqkit.rundir.RESUMABLE` settings).

    Any exception raised before the first training step (building a component, loading
    weights, data or a checkpoint, start-up checks) comes out as :class:`SetupError` with one
    line; a failure inside the loop keeps its traceback.
    """
    built, resumed_from = start_run(gin_files, gin_params, output_dir=output_dir, resume=resume)
    try:
        return fit(built, resumed_from=resumed_from)
    except KeyboardInterrupt as err:
        last = ckpt.latest_checkpoint(built.output_dir)
        raise RunInterrupted(built.output_dir, last) from err


def start_run(
    gin_files: Sequence[str | Path],
    gin_params: Sequence[str] = (),
    *,
    output_dir: str | Path | None = None,
    resume: bool = False,
    recipe: str | None = None,
    trusted: Sequence[str] = (),
) -> tuple[Run, int | None]:
    """Open the run directory, build the :class:`Run`, restore its last checkpoint (with
    ``resume``) and compute the reference accuracies; returns the run and the epoch it resumed
    from (``None``: a fresh start)."""
    check_launch()
    opened = rundir.open_run(
        gin_files, gin_params, output_dir=output_dir, resume=resume, recipe=recipe, trusted=trusted
    )
    if opened.note and int(os.environ.get("RANK", "0")) == 0:  # before Accelerate exists
        logging.getLogger(__name__).warning(opened.note)
    try:
        built = rundir.build(opened)
        rundir.check_read(opened)
        return built, prepare(built, resume=opened.resume)
    except BaseException as err:
        rundir.unlock_run_dir(opened.output_dir)
        if isinstance(err, ConfigError | NonFiniteLossError) or not isinstance(err, Exception):
            raise
        raise SetupError(cfg.one_line(err)) from err


def prepare(run: Run, *, resume: bool) -> int | None:
    """Before the loop: restore the newest checkpoint (``resume``), and, once per run, the
    teacher's and the naive student's test accuracy; returns the epoch resumed from."""
    run.loaders  # noqa: B018  (prepared before a checkpoint is restored into the accelerator)
    resumed_from = None
    if resume:
        last = run.load("last")
        if last is not None:
            resumed_from = run.state.epochs_done
            logger.info(f"resumed from {last} after epoch {resumed_from}", main_process_only=True)
    if not run.state.reference:
        _references(run)
    reference = run.state.reference
    logger.info(
        f"teacher test top-1 {reference['teacher']['top1']:.2f}, "
        f"naive {reference['naive']['top1']:.2f}",
        main_process_only=True,
    )
    if run.accelerator.is_main_process:
        cfg.save_operative_config(run.output_dir)
    return resumed_from


def _references(run: Run) -> None:
    """The teacher's accuracy, and the naive student's: quantized alike (the same data-free
    transforms included), its activation ranges observed on ``naive_batches`` noise batches, no
    training (the floor to beat)."""
    schedule, data, device = run.schedule, run.data, run.device
    t0 = time.perf_counter()
    set_seed(schedule.seed)
    teacher = run.teacher_test(keep_rng=False)
    teacher_eval = {k: v for k, v in teacher.items() if k != "predictions"}
    naive = quantize_with(copy.deepcopy(run.teacher), run.quant, run.example, run.transforms)
    with torch.no_grad():
        for _ in range(schedule.naive_batches):
            naive(noise_batch(data, schedule.batch_size, device))
    sync_quantizers(naive)
    set_quant_mode(naive, "frozen")
    run.state.reference = {"teacher": teacher_eval, "naive": run.evaluate(naive, "test")}
    run.state.add_seconds("references", time.perf_counter() - t0)
    run.calibration.start_from(naive, run.student_module)
    set_seed(schedule.seed, device_specific=True)  # each process samples its own latents


def fit(run: Run, *, resumed_from: int | None = None) -> dict[str, Any]:
    """Train ``run`` from its state to the last epoch (then its post-training stage); returns
    the metrics, also written to ``metrics.json``. The run directory's lock, taken when it was
    opened, is released when this returns or raises (Ctrl-C included)."""
    try:
        return _fit(run, resumed_from)
    finally:
        rundir.unlock_run_dir(run.output_dir)


def _fit(run: Run, resumed_from: int | None) -> dict[str, Any]:
    schedule, state, acc = run.schedule, run.state, run.accelerator
    for epoch in range(state.epochs_done, schedule.epochs):
        patience = schedule.early_stopping_patience
        if patience is not None and state.evals_since_best >= patience:
            break
        losses = _train_epoch(run, epoch)
        _check_nonfinite(run, epoch + 1)
        state.epochs_done = done = epoch + 1
        record = epoch_record(run, losses)
        scalars = {f"loss/{k}": v for k, v in losses.items()}
        improved = False
        if run.calibration.ready(done) and (
            done % schedule.eval_every == 0 or done == schedule.epochs
        ):
            improved = _evaluate_epoch(run, record)
            save_media(run)
        state.history.append(record)
        _log_epoch(run, record)
        acc.log({**scalars, **record_scalars(record)}, step=done)
        path = ckpt.save_checkpoint(acc, run.output_dir, done, keep=schedule.checkpoint_keep)
        if improved:
            ckpt.save_best(acc, run.output_dir, path)
    if run.reconstruction is not None and run.reconstruction.pending(state.units_done):
        _post_training(run)
    metrics = summarize(
        state, recipe=run.recipe, seed=schedule.seed, quant=run.quant, resumed_from=resumed_from
    )
    metrics["float_layers"] = float_layers(run.student_module)  # conv/linear left in float
    metrics["processes"] = process_report(run)
    metrics["evaluation"] = {"data": run.data.name, "labels": run.data.labelled_by}
    if run.note:
        metrics["note"] = run.note
    stage = run.reconstruction
    budget = getattr(stage.reconstruction, "iterations", None) if stage is not None else None
    warnings = reconstruction_warnings(state.history, budget)
    if warnings:
        metrics["warnings"] = warnings
        for line in warnings:
            logger.warning(line, main_process_only=True)
    if acc.is_main_process:
        (run.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        cfg.save_operative_config(run.output_dir)
    acc.wait_for_everyone()
    acc.end_training()
    metrics["output_dir"] = str(run.output_dir)
    metrics["main_process"] = acc.is_main_process
    return metrics


def _log_epoch(run: Run, record: dict[str, Any]) -> None:
    logger.info(epoch_line(record, run.state.best), main_process_only=True)


def _train_epoch(run: Run, epoch: int) -> dict[str, float]:
    """The iterations of (0-based) ``epoch``; returns the loss means of the epoch."""
    schedule, state = run.schedule, run.state
    run.set_epoch_learning_rates(epoch)
    phase = Phase(
        generator=True,
        observe=run.calibration.observes(epoch),
        student=schedule.trains_student_in(epoch),
    )
    set_quant_mode(run.student, "observe" if phase.observe else "frozen")
    run.generator.train()
    t0 = time.perf_counter()
    bar = tqdm(
        range(schedule.iters_per_epoch),
        desc=f"epoch {epoch + 1}/{schedule.epochs}",
        leave=False,
        disable=not run.accelerator.is_local_main_process,
        mininterval=2.0,
    )
    for i in bar:
        run.set_generator_iteration_lr(state.iterations + i)
        run.engine.iteration(phase, epoch)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    seconds = time.perf_counter() - t0
    state.train_seconds += seconds
    state.add_seconds("training" if phase.student else "calibration", seconds)
    state.iterations += schedule.iters_per_epoch
    if phase.observe:
        sync_quantizers(run.student)
    return run.engine.pop_loss_means()


def _check_nonfinite(run: Run, epoch: int) -> None:
    """Log skipped non-finite steps of ``epoch``; stop the run when one optimizer skipped
    ``max_nonfinite_in_a_row`` steps in a row (before this epoch's checkpoint is written)."""
    counts = run.engine.pop_nonfinite()
    skipped = {side: n for side, (n, _) in counts.items() if n}
    if not skipped:
        return
    for side, n in skipped.items():
        run.state.skipped_steps[side] = run.state.skipped_steps.get(side, 0) + n
    longest = max(streak for _, streak in counts.values())
    logger.warning(
        f"epoch {epoch}: skipped "
        + " and ".join(f"{n} {side} step(s)" for side, n in skipped.items())
        + f" with a non-finite loss or gradient (longest run in a row: {longest})",
        main_process_only=True,
    )
    limit = run.schedule.max_nonfinite_in_a_row
    if longest >= limit:
        last = ckpt.latest_checkpoint(run.output_dir)
        kept = f"the last complete checkpoint {str(last)!r} is kept" if last else "no checkpoint"
        raise NonFiniteLossError(
            f"{longest} steps in a row had a non-finite loss or gradient in epoch {epoch} "
            f"(train.max_nonfinite_in_a_row = {limit}); stopped before saving epoch {epoch}, "
            f"{kept}: lower the learning rates or loss weights and --resume"
        )


def _evaluate_epoch(run: Run, record: dict[str, Any]) -> bool:
    """Evaluate the student on val and test into ``record``; returns whether it is the new
    best. A run that trains the student selects among the epochs that trained it (the
    calibrated student before the first step is kept as ``state.calibrated``, reported apart);
    a run that never trains it (PTQ) has no selection: its latest evaluation is the best."""
    state = run.state
    model = run.student_module
    set_quant_mode(model, "frozen")  # real evaluation images must not move observed ranges
    t0 = time.perf_counter()
    if run.data.val is run.data.test:  # a set whose validation split is its test split
        val = test = run.evaluate(model, "test")
    else:
        val, test = run.evaluate(model, "val"), run.evaluate(model, "test")
    state.add_seconds("evaluation", time.perf_counter() - t0)
    record.update(
        val_top1=val["top1"],
        test_top1=test["top1"],
        test_top5=test["top5"],
        test_agree=test["agree"],
    )
    if record["phase"] == "calibration" and run.schedule.trains_student:
        state.calibrated = headline(record)
        return False
    improved = (
        not run.schedule.trains_student
        or state.best is None
        or record["val_top1"] > state.best["val_top1"]
    )
    if improved:
        state.best, state.evals_since_best = headline(record), 0
    else:
        state.evals_since_best += 1
    return improved


def reconstruction_warnings(history: Sequence[dict[str, Any]], budget: int | None) -> list[str]:
    """A line when the post-training reconstruction ended with a lower validation top-1 than
    the best student before it: the run's result is the reconstructed student (the method's
    output, and its best and last model), so a budget too small for the model must not pass
    unsaid. ``budget``: its steps per unit, when it has such a figure."""
    after = [r for r in history if r.get("stage") == "reconstructed" and "val_top1" in r]
    before = [r for r in history if r.get("stage") != "reconstructed" and "val_top1" in r]
    if not after or not before:
        return []
    prev = max(before, key=lambda r: r["val_top1"])
    got = after[-1]
    if got["val_top1"] >= prev["val_top1"]:
        return []
    return [
        f"the reconstruction lowered validation top-1 from {prev['val_top1']:.2f} (epoch "
        f"{prev['epoch']}, before it; test {prev['test_top1']:.2f}) to {got['val_top1']:.2f} "
        f"(test {got['test_top1']:.2f}); the result is the reconstructed student. Its budget"
        + (f" ({budget} steps per unit)" if budget is not None else "")
        + " may be too small for this model: raise ptq.BlockReconstruction.iterations, or "
        "drop train.reconstruction to keep the student before it"
    ]


def _post_training(run: Run) -> None:
    """Run the reconstruction stage from unit ``state.units_done`` on, with a checkpoint after
    each unit; the student after the last unit is evaluated and is the best and last model."""
    stage, state, acc = run.reconstruction, run.state, run.accelerator
    images = stage.calibration_images(run)
    units = stage.units
    for i in range(state.units_done, len(units)):
        loss, seconds = stage.reconstruct(run, i, images)
        state.post_seconds = getattr(state, "post_seconds", 0.0) + seconds
        state.add_seconds("reconstruction", seconds)
        state.units_done = i + 1
        logger.info(
            f"reconstructed unit {i + 1}/{len(units)} ({units[i].name}): mean loss "
            f"{loss:.4g} in {seconds:.1f} s",
            main_process_only=True,
        )
        last = state.units_done == len(units)
        if last:
            record = {
                "epoch": state.epochs_done,
                "phase": "reconstructed",
                "stage": "reconstructed",
            }
            _evaluate_epoch(run, record)
            state.history.append(record)
            state.best, state.evals_since_best = headline(record), 0
            _log_epoch(run, record)
            acc.log(record_scalars(record), step=state.epochs_done + 1)
        path = ckpt.save_checkpoint(
            acc, run.output_dir, state.epochs_done, keep=run.schedule.checkpoint_keep, unit=i + 1
        )
        if last:
            ckpt.save_best(acc, run.output_dir, path)


def main(argv: Sequence[str] | None = None, *, prog: str = "dfqkit.train") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument(
        "--gin",
        action="append",
        default=[],
        metavar="FILE",
        help="gin file (recipe or fragment); repeatable; optional with --resume",
    )
    parser.add_argument(
        "--gin_param",
        action="append",
        default=[],
        metavar="BINDING",
        help='a binding such as "W_BITS = 3"; repeatable',
    )
    parser.add_argument("--output_dir", default=None, help="run directory (default runs/...)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output_dir from its last complete checkpoint and its own "
        "config.gin",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        known, _ = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])
        parser.print_help()
        for recipe in known.gin:  # what the recipe lets you set
            try:
                print("\n" + describe_recipe(recipe), end="")
            except ConfigError as err:
                print(f"\n{recipe}: {cfg.one_line(err)}")
        return 0
    args = parser.parse_args(argv)
    if not args.gin and not args.resume:
        parser.error("--gin RECIPE is required (or --resume --output_dir RUN)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("accelerate.accelerator", "accelerate.checkpointing"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        metrics = run(args.gin, args.gin_param, output_dir=args.output_dir, resume=args.resume)
    except (ConfigError, FileNotFoundError, ValueError, FileExistsError) as err:
        if args.debug:
            raise
        print(f"{prog}: error: {cfg.one_line(err)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        if args.debug:
            raise
        print(f"{prog}: stopped: {cfg.one_line(err)}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as err:
        if args.debug:
            raise
        print(f"{prog}: {interrupted_message(err, args.output_dir)}", file=sys.stderr)
        return 130
    if metrics.get("main_process", True) and not math.isnan(metrics["best"]["test_top1"]):
        print(summary_line(metrics))
        if metrics.get("note"):
            print(metrics["note"])
        for line in metrics.get("warnings", []):
            print(f"warning: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
