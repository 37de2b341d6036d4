"""The single gin root ``train`` and the command line.

    python -m dfqkit.train --gin recipes/mnist/gdfq_w4a4.gin [--gin FILE ...]
        [--gin_param "KEY = VALUE" ...] [--output_dir DIR] [--resume] [--debug]

identical under ``accelerate launch -m dfqkit.train ...``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gin
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch import nn
from tqdm.auto import tqdm

from dfqkit import checkpoint as ckpt
from dfqkit import config as cfg
from dfqkit.engine import Engine, Phase
from dfqkit.evaluate import evaluate
from dfqkit.guard import NonFiniteLossError
from dfqkit.losses.base import Loss
from dfqkit.mixers import NoMixer
from dfqkit.quant import (
    QuantConfig,
    act_quantizers,
    quantize_,
    set_quant_mode,
    sync_quantizers,
)
from dfqkit.runs import (
    check_setup,
    log_media,
    noise_batch,
    prepare_output_dir,
    save_samples,
    summarize,
)

logger = get_logger(__name__)

MIXED_PRECISION = ("no", "bf16", "fp16")
CALIBRATIONS = ("generator", "noise", "final")
GENERATOR_SCHEDULES = ("multistep", "cosine")
# GDFQ's optimizers (recipes bind their own through gin's torch.optim configurables)
GENERATOR_OPTIMIZER = functools.partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.999))
STUDENT_OPTIMIZER = functools.partial(
    torch.optim.SGD, lr=1e-4, momentum=0.9, nesterov=True, weight_decay=1e-4
)


class SetupError(cfg.ConfigError):
    """An exception raised while building a run, before its first training step, as one line
    (the CLI prints it without a traceback unless ``--debug``)."""


# whether the current train() has entered its loop: errors before it are set-up errors
_LOOP_STARTED = False


def _gin_root(fn):
    # Under `python -m dfqkit.train` this file also runs as __main__; only the importable module
    # registers the gin root (a second registration would clash), and __main__ delegates to it.
    if __name__ == "__main__":
        return fn
    return gin.configurable(
        fn, module="dfqkit", denylist=["output_dir", "resume", "recipe", "benchmark", "inspect"]
    )


@_gin_root
def train(
    *,
    teacher: nn.Module = gin.REQUIRED,
    data: Any = gin.REQUIRED,
    generator: nn.Module = gin.REQUIRED,
    losses: Sequence[Loss] = gin.REQUIRED,
    quant: QuantConfig = gin.REQUIRED,
    mixer: nn.Module | None = None,
    epochs: int = 400,
    iters_per_epoch: int = 200,
    batch_size: int = 200,
    warmup_epochs: int = 4,
    calib_epochs: int = 4,
    calibration: str = "generator",
    generator_lr_schedule: str = "multistep",
    generator_lr_warmup_iters: int = 0,
    generator_optimizer: Callable[..., torch.optim.Optimizer] = GENERATOR_OPTIMIZER,
    student_optimizer: Callable[..., torch.optim.Optimizer] = STUDENT_OPTIMIZER,
    lr_milestones: Sequence[int] = (100, 200, 300),
    lr_gamma: float = 0.1,
    eval_every: int = 1,
    early_stopping_patience: int | None = None,
    naive_batches: int = 200,
    mixed_precision: str = "no",
    seed: int = 0,
    checkpoint_keep: int = 2,
    output_dir: str | Path | None = None,
    resume: bool = False,
    recipe: str = "",
    benchmark: tuple[int, int] | None = None,
    inspect: bool = False,
    trackers: Sequence[str] | str | None = "auto",
    max_nonfinite_in_a_row: int = 20,
    deterministic: bool = False,
    perturbation_eps: float = 0.0,
    reconstruction: Any | None = None,
) -> dict[str, Any]:
    """Run one DFQ experiment and return its metrics (also written to ``metrics.json``).

    Args:
        teacher: full-precision classifier (frozen; eval mode).
        data: :class:`~dfqkit.data.EvalData` with the real val/test sets used for evaluation.
        generator: image source (see :mod:`dfqkit.generators`).
        losses: every loss; each declares its side (generator or student).
        quant: how the student is quantized.
        mixer: a mixer (default: none).
        epochs, iters_per_epoch, batch_size: the budget (batch size per process).
        warmup_epochs: epochs in which only the generator trains.
        calib_epochs: epochs in which activation observers update; frozen afterwards.
        calibration: where the student's activation ranges come from: ``"generator"`` (GDFQ:
            observed on the synthesized batches during the first ``calib_epochs``) or
            ``"noise"`` (the naive reference's ranges, observed on ``naive_batches`` Gaussian
            noise batches before training; ``calib_epochs`` is then unused; an ablation knob:
            see docs/results.md for why the source of the ranges matters at 3-bit
            activations), or ``"final"`` (observed on the synthesized batches of the *last*
            ``calib_epochs`` epochs: PTQ methods such as PSAQ-ViT, which calibrate on their
            finished images; the student is evaluated only once its ranges exist, and it may
            train only from then on).
        generator_lr_schedule: ``"multistep"`` (``lr_milestones``/``lr_gamma``, per epoch) or
            ``"cosine"`` (per iteration: linear warm-up over ``generator_lr_warmup_iters``,
            then cosine decay to 0 at the last iteration; PSAQ-ViT's pixel optimizer).
        generator_lr_warmup_iters: warm-up iterations of the cosine schedule.
        generator_optimizer, student_optimizer: optimizer factories taking parameters.
        lr_milestones, lr_gamma: multi-step schedule (per epoch) applied to both optimizers.
        eval_every: evaluate the student every this many epochs (and after the last).
        early_stopping_patience: stop after this many evaluations without a better val top-1.
        naive_batches: Gaussian-noise batches that calibrate the naive (untrained) reference;
            200 lets GDFQ's bias-corrected EMA settle (it inflates ranges for ~150 updates).
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (fake quantization stays fp32).
        seed: sampling seed (each process draws different latents from it).
        checkpoint_keep: complete checkpoints kept.
        output_dir: run directory (config, checkpoints, samples, metrics.json).
        resume: continue from the newest complete checkpoint in ``output_dir``.
        recipe: the recipe's name, recorded in the metrics.
        benchmark: ``(warmup, iterations)``: instead of training, time that many steady-state
            iterations (generator and student step) after ``warmup`` calibrating ones, and
            return the timings (used by ``python -m dfqkit.bench speed``).
        trackers: Accelerate trackers for ``accelerator.log`` (``"tensorboard"``, ``"wandb"``,
            ...); ``"auto"``: TensorBoard when it is installed, else none; ``None`` or ``[]``:
            none. Scalars every epoch; at each evaluation the grid of synthesized samples and,
            where the tracker supports it (TensorBoard), histograms of the teacher's activation
            values on that batch. Logs live under ``OUTPUT_DIR/logs``; the run directory stays
            the source of truth.
        inspect: build everything, load the newest checkpoint of ``output_dir`` (with
            ``resume``), and return the parts instead of training (``teacher``, ``generator``,
            ``mixer``, ``student``, ``data``, ``device``, ``epochs_done``; used by
            ``python -m dfqkit.diagnose``).
        max_nonfinite_in_a_row: a step whose loss or gradients are not finite is skipped on the
            device (parameters and optimizer state unchanged; :mod:`dfqkit.guard`) and counted;
            the counts are read once per epoch, logged as a warning, and the run stops with
            :class:`~dfqkit.guard.NonFiniteLossError` before saving that epoch when one
            optimizer skipped this many steps in a row. Checkpoints already saved are kept.
        deterministic: force deterministic kernels (``torch.use_deterministic_algorithms``, no
            cuDNN autotuning, ``CUBLAS_WORKSPACE_CONFIG``); an op without a deterministic
            implementation then raises. CPU runs are deterministic without it
            (docs/training.md, "Determinism").
        perturbation_eps: HAST's one-step perturbed sample in the student step (0: off): the
            student loss is also computed on ``x + eps · sign(∇x L)`` and added
            (:class:`~dfqkit.engine.Engine`).
        reconstruction: a post-training stage run after the last epoch, unit by unit, with a
            checkpoint after each (``@ptq.BlockReconstruction()``, Genie-M); its result is
            evaluated and reported as both best and last (PTQ has no model selection). Needs
            a student that never trains (``warmup_epochs >= epochs``).
    """
    global _LOOP_STARTED
    _LOOP_STARTED = False
    for name, value, low in (
        ("epochs", epochs, 1),
        ("iters_per_epoch", iters_per_epoch, 1),
        ("batch_size", batch_size, 1),
        ("eval_every", eval_every, 1),
        ("warmup_epochs", warmup_epochs, 0),
        ("calib_epochs", calib_epochs, 0),
        ("generator_lr_warmup_iters", generator_lr_warmup_iters, 0),
        ("naive_batches", naive_batches, 1),
        ("max_nonfinite_in_a_row", max_nonfinite_in_a_row, 1),
        ("checkpoint_keep", checkpoint_keep, 1),
        ("seed", seed, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise cfg.ConfigError(f"train.{name} must be an integer >= {low}, got {value!r}")
    if early_stopping_patience is not None and (
        not isinstance(early_stopping_patience, int) or early_stopping_patience < 1
    ):
        raise cfg.ConfigError(
            "train.early_stopping_patience must be None or an integer >= 1, "
            f"got {early_stopping_patience!r}"
        )
    if generator_lr_schedule not in GENERATOR_SCHEDULES:
        raise cfg.ConfigError(
            f"train.generator_lr_schedule must be one of {GENERATOR_SCHEDULES}, "
            f"got {generator_lr_schedule!r}"
        )
    if calibration == "final" and warmup_epochs < epochs - calib_epochs:
        raise cfg.ConfigError(
            f"train.calibration = 'final' observes ranges in the last calib_epochs={calib_epochs} "
            f"of epochs={epochs}, so the student cannot train before epoch "
            f"{epochs - calib_epochs}: set train.warmup_epochs >= {epochs - calib_epochs} "
            f"(got {warmup_epochs})"
        )
    if calibration not in CALIBRATIONS:
        raise cfg.ConfigError(
            f"train.calibration must be one of {CALIBRATIONS}, got {calibration!r}"
        )
    if not isinstance(perturbation_eps, int | float) or perturbation_eps < 0:
        raise cfg.ConfigError(
            f"train.perturbation_eps must be a number >= 0, got {perturbation_eps!r}"
        )
    if not isinstance(deterministic, bool):
        raise cfg.ConfigError(f"train.deterministic must be True or False, got {deterministic!r}")
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if mixed_precision not in MIXED_PRECISION:
        raise cfg.ConfigError(
            f"train.mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}"
        )
    if reconstruction is not None and warmup_epochs < epochs:
        raise cfg.ConfigError(
            f"train.reconstruction is a post-training stage, so the student must not train "
            f"before it: set train.warmup_epochs >= train.epochs={epochs} (got {warmup_epochs})"
        )
    mixer = NoMixer() if mixer is None else mixer
    out = prepare_output_dir(output_dir, resume=resume)
    # Each process observes its own batches; ranges are merged by sync_quantizers, not by DDP's
    # per-forward buffer broadcast from rank 0.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    # a process may run several trainings (bench, tests, notebooks): each sets its own precision
    AcceleratorState._reset_state()
    log_with = _resolve_trackers(trackers)
    # Several processes without a GPU (torchrun on CPU): Accelerate forms the gloo group only
    # when told the run is on the CPU; with a GPU it picks the device itself.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    acc = Accelerator(
        cpu=multi_cpu,
        mixed_precision=mixed_precision,
        project_dir=str(out),
        kwargs_handlers=[ddp],
        log_with=log_with or None,
    )
    if log_with and not inspect and benchmark is None:
        acc.project_configuration.logging_dir = str(out / "logs")
        acc.init_trackers(
            "dfqkit",
            config={"recipe": recipe, "seed": seed, "epochs": epochs, "batch_size": batch_size},
        )
    device = acc.device

    # ---- build and check everything before any training step
    teacher = teacher.to(device).eval().requires_grad_(False)
    generator, mixer = generator.to(device), mixer.to(device)
    check_setup(
        teacher=teacher,
        data=data,
        generator=generator,
        mixer=mixer,
        losses=losses,
        batch_size=batch_size,
        device=device,
        trains_student=warmup_epochs < epochs,
    )
    example = noise_batch(data, 2, device)
    for part in (generator, mixer):  # teacher-dependent parts are built before the optimizers
        if hasattr(part, "bind"):
            part.bind(teacher=teacher, generator=generator, example=example)
    student = quantize_(copy.deepcopy(teacher), quant, example).requires_grad_(True).eval()
    units = []
    if reconstruction is not None:
        try:
            reconstruction.check(student)
            units = reconstruction.units(teacher, student, example)
        except ValueError as err:
            raise cfg.ConfigError(str(err)) from err
    if acc.num_processes > 1 and generator.trainable:
        _freeze_unused(generator, mixer, device)
    gen_params = [p for m in (generator, mixer) for p in m.parameters() if p.requires_grad]
    gen_opt = generator_optimizer(gen_params) if gen_params and generator.trainable else None
    student_opt = _student_optimizer(student_optimizer, student)
    state = ckpt.TrainState()
    if gen_opt is not None:
        generator, gen_opt = acc.prepare(generator, gen_opt)
    else:
        acc.register_for_checkpointing(generator)
    if any(True for _ in mixer.parameters()):
        # not DDP-wrapped: parts of a mixer train from losses outside its forward (the level
        # classifiers) or only in some epochs; the engine all-reduces its gradients instead
        acc.register_for_checkpointing(mixer)
    student, student_opt = acc.prepare(student, student_opt)
    acc.register_for_checkpointing(state)
    engine = Engine(
        accelerator=acc,
        teacher=teacher,
        student=student,
        generator=generator,
        mixer=mixer,
        losses=losses,
        generator_optimizer=gen_opt,
        student_optimizer=student_opt,
        batch_size=batch_size,
        example=example,
        perturbation_eps=perturbation_eps,
    )
    if benchmark is not None:
        return _benchmark(engine, student, *benchmark)
    loaders = {s: acc.prepare(data.loader(s, batch_size=256)) for s in ("val", "test")}
    base_lrs = [[g["lr"] for g in opt.param_groups] for opt in (gen_opt, student_opt) if opt]

    resumed_from = None
    if resume:
        last = ckpt.latest_checkpoint(out)
        if last is not None:
            ckpt.verify_checkpoint(last)  # readable, and nothing in it would run code
            try:
                acc.load_state(str(last))
            except (RuntimeError, KeyError, ValueError, IndexError) as err:
                lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()][:2]
                detail = " ".join(lines)[:300] or type(err).__name__
                raise cfg.ConfigError(
                    f"checkpoint {str(last)!r} does not fit this run ({detail}): it "
                    f"was written by another configuration; compare {str(out / 'config.gin')!r} "
                    "with the recipe and bindings given now"
                ) from err
            resumed_from = state.epochs_done
            logger.info(f"resumed from {last} after epoch {resumed_from}", main_process_only=True)
    if inspect:
        return {
            "teacher": teacher,
            "generator": generator,
            "mixer": mixer,
            "student": student,
            "data": data,
            "device": device,
            "epochs_done": state.epochs_done,
        }
    if not state.reference:
        set_seed(seed)
        teacher_eval = evaluate(teacher, loaders["test"], device=device, accelerator=acc)
        naive = quantize_(copy.deepcopy(teacher), quant, example)
        with torch.no_grad():
            for _ in range(naive_batches):
                naive(noise_batch(data, batch_size, device))
        sync_quantizers(naive)
        set_quant_mode(naive, "frozen")
        naive_eval = evaluate(
            naive, loaders["test"], teacher=teacher, device=device, accelerator=acc
        )
        state.reference = {"teacher": teacher_eval, "naive": naive_eval}
        if calibration == "noise":  # the student starts from the naive reference's ranges
            for src, dst in zip(
                act_quantizers(naive), act_quantizers(acc.unwrap_model(student)), strict=True
            ):
                dst.load_state_dict(src.state_dict())
        del naive
        set_seed(seed, device_specific=True)  # each process samples its own latents
    logger.info(
        f"teacher test top-1 {state.reference['teacher']['top1']:.2f}, "
        f"naive {state.reference['naive']['top1']:.2f}",
        main_process_only=True,
    )
    if acc.is_main_process:
        cfg.save_operative_config(out)

    # ---- the loop
    _LOOP_STARTED = True
    start_epoch = state.epochs_done
    for epoch in range(start_epoch, epochs):
        if (
            early_stopping_patience is not None
            and state.evals_since_best >= early_stopping_patience
        ):
            break
        decay = lr_gamma ** sum(epoch >= m for m in lr_milestones)
        for opt, lrs in zip((o for o in (gen_opt, student_opt) if o), base_lrs, strict=True):
            for group, lr in zip(opt.param_groups, lrs, strict=True):
                group["lr"] = lr * decay
        observe = (calibration == "generator" and epoch < calib_epochs) or (
            calibration == "final" and epoch >= epochs - calib_epochs
        )
        phase = Phase(generator=True, observe=observe, student=epoch >= warmup_epochs)
        set_quant_mode(student, "observe" if phase.observe else "frozen")
        generator.train()
        t0 = time.perf_counter()
        bar = tqdm(
            range(iters_per_epoch),
            desc=f"epoch {epoch + 1}/{epochs}",
            leave=False,
            disable=not acc.is_local_main_process,
            mininterval=2.0,
        )
        cosine = gen_opt is not None and generator_lr_schedule == "cosine"
        for i in bar:
            if cosine:
                factor = _cosine(
                    state.iterations + i, epochs * iters_per_epoch, generator_lr_warmup_iters
                )
                for group, lr in zip(gen_opt.param_groups, base_lrs[0], strict=True):
                    group["lr"] = lr * factor
            engine.iteration(phase, epoch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        state.train_seconds += time.perf_counter() - t0
        state.iterations += iters_per_epoch
        if phase.observe:
            sync_quantizers(student)
        scalars = engine.pop_loss_means()
        _check_nonfinite(engine, state, epoch + 1, max_nonfinite_in_a_row, out)
        state.epochs_done = epoch + 1
        calibrated = calibration != "final" or state.epochs_done > epochs - calib_epochs
        if calibrated and (state.epochs_done % eval_every == 0 or state.epochs_done == epochs):
            scalars.update(_evaluate_epoch(acc, student, teacher, loaders, state, device))
            if acc.is_main_process:
                save_samples(
                    engine.last_batch, data, out / "samples" / f"epoch_{epoch + 1:04d}.png"
                )
                if log_with:
                    log_media(acc, teacher, engine.last_batch, data, state.epochs_done)
        acc.log(scalars, step=state.epochs_done)
        ckpt.save_checkpoint(acc, out, state.epochs_done, keep=checkpoint_keep)

    if reconstruction is not None and state.units_done < len(units):
        _reconstruct(
            acc,
            reconstruction,
            units,
            teacher,
            student,
            generator,
            mixer,
            loaders,
            state,
            out,
            batch_size=batch_size,
            seed=seed,
            keep=checkpoint_keep,
        )

    metrics = summarize(state, recipe=recipe, seed=seed, quant=quant, resumed_from=resumed_from)
    metrics["processes"] = _process_report(acc, student, engine)
    if acc.is_main_process:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        cfg.save_operative_config(out)
    acc.wait_for_everyone()
    acc.end_training()
    metrics["output_dir"] = str(out)
    metrics["main_process"] = acc.is_main_process
    return metrics


def _check_nonfinite(engine: Engine, state, epoch: int, limit: int, out: Path) -> None:
    """Log skipped non-finite steps of ``epoch``; stop the run when one optimizer skipped
    ``limit`` steps in a row (before this epoch's checkpoint is written)."""
    counts = engine.pop_nonfinite()
    skipped = {side: n for side, (n, _) in counts.items() if n}
    if not skipped:
        return
    for side, n in skipped.items():
        state.skipped_steps[side] = state.skipped_steps.get(side, 0) + n
    longest = max(run for _, run in counts.values())
    logger.warning(
        f"epoch {epoch}: skipped "
        + " and ".join(f"{n} {side} step(s)" for side, n in skipped.items())
        + f" with a non-finite loss or gradient (longest run in a row: {longest})",
        main_process_only=True,
    )
    if longest >= limit:
        last = ckpt.latest_checkpoint(out)
        kept = f"the last complete checkpoint {str(last)!r} is kept" if last else "no checkpoint"
        raise NonFiniteLossError(
            f"{longest} steps in a row had a non-finite loss or gradient in epoch {epoch} "
            f"(train.max_nonfinite_in_a_row = {limit}); stopped before saving epoch {epoch}, "
            f"{kept}: lower the learning rates or loss weights and --resume"
        )


def _freeze_unused(generator: nn.Module, mixer: nn.Module, device: torch.device) -> None:
    """Stop the generator's parameters that this configuration never uses from requiring
    gradients (e.g. its label embedding when a ``cond`` mixer provides the conditioning), so
    DistributedDataParallel does not wait for their gradients. One probe forward, with the RNG
    state and BN statistics left untouched."""
    from dfqkit.generators.base import synthesize

    params = [p for p in generator.parameters() if p.requires_grad]
    if not params:
        return
    mode = generator.training
    generator.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        batch = synthesize(generator, mixer, 2, device)
        grads = torch.autograd.grad(batch.images.float().sum(), params, allow_unused=True)
    generator.train(mode)
    unused = [p for p, g in zip(params, grads, strict=True) if g is None]
    for p in unused:
        p.requires_grad_(False)
    if unused:
        logger.info(
            f"{len(unused)} generator parameter tensor(s) are not used by this configuration "
            "and are frozen (DDP)",
            main_process_only=True,
        )


def _process_report(acc, student: nn.Module, engine: Engine) -> dict[str, Any]:
    """Once, at the end: do all processes hold the same student (weights and quantizer
    ranges), and did they sample different latents? (Gathered from every rank.)"""
    state = acc.unwrap_model(student).state_dict()
    values = [v.detach().double() for v in state.values() if v.is_floating_point()]
    signature = torch.stack([sum(v.sum() for v in values), sum(v.abs().sum() for v in values)])
    batch = engine.last_batch
    z = batch.z if batch is not None and batch.z is not None else None
    latent = z.double().sum() if z is not None else torch.zeros((), dtype=torch.float64)
    row = torch.cat([signature, latent[None]]).to(acc.device)[None]
    rows = acc.gather(row).cpu()  # (processes, 3)
    return {
        "count": acc.num_processes,
        "identical_student": bool((rows[:, :2] == rows[0, :2]).all()),
        "latent_sums": rows[:, 2].tolist(),
    }


def _resolve_trackers(trackers: Sequence[str] | str | None) -> list[str]:
    if trackers is None:
        return []
    if trackers == "auto":
        import importlib.util

        return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    names = [trackers] if isinstance(trackers, str) else list(trackers)
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    unknown = [n for n in names if n not in LOGGER_TYPE_TO_CLASS]
    if unknown:
        raise cfg.ConfigError(
            f"train.trackers: unknown tracker(s) {unknown}; Accelerate knows "
            f"{sorted(LOGGER_TYPE_TO_CLASS)}"
        )
    return names


def _cosine(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _student_optimizer(factory: Callable[..., torch.optim.Optimizer], student: nn.Module):
    """The student optimizer; modules declaring ``param_group`` (learnable clip bounds) get
    their own parameter group with their ``lr`` (``None``: the student's) and
    ``weight_decay``."""
    special: dict[tuple[float | None, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module in student.modules():
        if getattr(module, "param_group", None):
            key = (module.lr, float(module.weight_decay))
            for p in module.parameters(recurse=False):
                special.setdefault(key, []).append(p)
                seen.add(id(p))
    if not special:
        return factory(student.parameters())
    groups = [{"params": [p for p in student.parameters() if id(p) not in seen]}]
    for (lr, wd), params in special.items():
        group = {"params": params, "weight_decay": wd}
        if lr is not None:
            group["lr"] = lr
        groups.append(group)
    return factory(groups)


def _benchmark(engine: Engine, student: nn.Module, warmup: int, iterations: int) -> dict:
    set_quant_mode(student, "observe")
    for _ in range(warmup):
        engine.iteration(Phase(generator=True, observe=True, student=True), 0)
    set_quant_mode(student, "frozen")
    marks: list[float] = []
    for _ in range(iterations):
        engine.iteration(Phase(generator=True, observe=False, student=True), 0, marks)
    engine.pop_loss_means()
    return {"marks": marks}


def _reconstruct(
    acc,
    reconstruction,
    units,
    teacher,
    student,
    generator,
    mixer,
    loaders,
    state,
    out,
    *,
    batch_size: int,
    seed: int,
    keep: int,
) -> None:
    """Run the post-training reconstruction from unit ``state.units_done`` on, saving a
    checkpoint after each unit; evaluate after the last one (that result is best and last)."""
    model = acc.unwrap_model(student)
    set_quant_mode(model, "frozen")
    device = acc.device
    images = reconstruction.calibration_images(generator, mixer, batch_size, device, seed)
    for i in range(state.units_done, len(units)):
        t0 = time.perf_counter()
        loss = reconstruction.reconstruct_unit(
            teacher, model, units[i], images, seed=seed * 100_003 + i
        )
        state.train_seconds += time.perf_counter() - t0
        state.units_done = i + 1
        logger.info(
            f"reconstructed unit {i + 1}/{len(units)} ({units[i].name}): mean loss "
            f"{float(loss):.4g} in {time.perf_counter() - t0:.1f} s",
            main_process_only=True,
        )
        if state.units_done == len(units):
            scalars = _evaluate_epoch(acc, student, teacher, loaders, state, device)
            state.history[-1]["stage"] = "reconstructed"
            state.best, state.evals_since_best = state.history[-1], 0
            acc.log(scalars, step=state.epochs_done + 1)
        ckpt.save_checkpoint(acc, out, state.epochs_done, keep=keep, unit=state.units_done)


def _evaluate_epoch(acc, student, teacher, loaders, state, device) -> dict[str, float]:
    model = acc.unwrap_model(student)
    set_quant_mode(model, "frozen")  # real evaluation images must not move observed ranges
    val = evaluate(model, loaders["val"], device=device, accelerator=acc)
    test = evaluate(model, loaders["test"], teacher=teacher, device=device, accelerator=acc)
    record = {
        "epoch": state.epochs_done,
        "val_top1": val["top1"],
        "test_top1": test["top1"],
        "test_top5": test["top5"],
        "test_agree": test["agree"],
    }
    state.history.append(record)
    if state.best is None or record["val_top1"] > state.best["val_top1"]:
        state.best, state.evals_since_best = record, 0
    else:
        state.evals_since_best += 1
    logger.info(
        f"epoch {state.epochs_done}: val {val['top1']:.2f} test {test['top1']:.2f} "
        f"(best val {state.best['val_top1']:.2f} @ {state.best['epoch']})",
        main_process_only=True,
    )
    return {"eval/val_top1": val["top1"], "eval/test_top1": test["top1"]}


def run(
    gin_files: Sequence[str],
    gin_params: Sequence[str] = (),
    *,
    output_dir: str | Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Parse a configuration and run ``train`` (what the CLI, the bench and tests call).

    Any exception raised before the first training step (building a component, loading
    weights or data, start-up checks) comes out as :class:`SetupError` with one line.
    """
    global _LOOP_STARTED
    files = cfg.parse(gin_files, gin_params)
    seed = cfg.macro_value("SEED", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise cfg.ConfigError(f"SEED must be an integer >= 0, got {seed!r}")
    if output_dir is None:
        output_dir = Path("runs") / cfg.run_name(files[0]) / f"seed{seed}"
    out = prepare_output_dir(output_dir, resume=resume)
    if not resume or not (out / "config.gin").exists():
        cfg.save_config(out, files, gin_params)
    torch.manual_seed(seed)  # components built by gin references are initialised identically
    _LOOP_STARTED = False
    try:
        return train(output_dir=out, resume=resume, recipe=cfg.recipe_name(files[0]))
    except (cfg.ConfigError, NonFiniteLossError):
        raise
    except Exception as err:
        if _LOOP_STARTED:  # a failure while training is not a set-up problem: keep it whole
            raise
        raise SetupError(cfg.one_line(err)) from err


def load_run(run_dir: str | Path, *, need_checkpoint: bool = True) -> dict[str, Any]:
    """Rebuild a finished (or interrupted) run from its directory, without training.

    Parses ``run_dir/config.gin``, builds every part and loads the newest complete checkpoint
    (``train(inspect=True)``). Returns those parts plus ``student_module`` (the unwrapped
    student on its device, eval mode, activation ranges frozen), ``image_size``, ``channels``.
    Used by export, diagnose and ``dfqkit.quantize``.

    Raises:
        ConfigError: not a run directory, or (``need_checkpoint``) no complete checkpoint.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.gin").is_file():
        raise cfg.ConfigError(f"--run {str(run_dir)!r} has no config.gin: not a dfqkit run")
    cfg.parse([run_dir / "config.gin"])
    sizes = {"image_size": cfg.macro_value("IMAGE_SIZE"), "channels": cfg.macro_value("CHANNELS")}
    parts = train(output_dir=run_dir, resume=True, inspect=True)
    if need_checkpoint and parts["epochs_done"] == 0:
        raise cfg.ConfigError(f"--run {str(run_dir)!r} has no complete checkpoint")
    student = getattr(parts["student"], "module", parts["student"]).eval()
    set_quant_mode(student, "frozen")
    return {**parts, **sizes, "student_module": student}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dfqkit.train", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--gin",
        action="append",
        required=True,
        metavar="FILE",
        help="gin file (recipe or fragment); repeatable",
    )
    parser.add_argument(
        "--gin_param",
        action="append",
        default=[],
        metavar="BINDING",
        help='a binding such as "W_BITS = 3"; repeatable',
    )
    parser.add_argument("--output_dir", default=None, help="run directory (default runs/...)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("accelerate.accelerator", "accelerate.checkpointing"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        metrics = run(args.gin, args.gin_param, output_dir=args.output_dir, resume=args.resume)
    except (cfg.ConfigError, FileNotFoundError, ValueError, FileExistsError) as err:
        if args.debug:
            raise
        print(f"dfqkit.train: error: {cfg.one_line(err)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        if args.debug:
            raise
        print(f"dfqkit.train: stopped: {cfg.one_line(err)}", file=sys.stderr)
        return 3
    m = metrics
    if m.get("main_process", True) and not math.isnan(m["best"]["test_top1"]):
        print(
            f"teacher {m['teacher']['test_top1']:.2f} | naive {m['naive']['test_top1']:.2f} | "
            f"quantized best-val epoch {m['best']['epoch']}: {m['best']['test_top1']:.2f}, "
            f"last {m['last']['test_top1']:.2f} | run directory: {m['output_dir']}"
        )
    return 0


if __name__ == "__main__":
    from dfqkit.train import main as _main  # the module that registered the gin root

    sys.exit(_main())
