"""The one place where a run is built: the gin root ``train`` returns a :class:`Run`.

Every binding a recipe writes as ``train.<name>`` is an argument of :func:`build_run` (the
gin name ``train`` is kept because every recipe and command line uses it). ``build_run`` builds
and checks every part — the accelerator, teacher, student and its quantization, generator,
mixer, losses, optimizers and their schedules, the engine, the evaluation loaders, the loop
state and checkpointing, and the method's phases — and returns them as one :class:`Run`.
Nothing trains here: :func:`dfqkit.train.fit` is the loop over a ``Run``; ``load_run``,
the benchmarks, ``diagnose``, ``export`` and ``dfqkit.quantize`` start from a ``Run`` too.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import inspect
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gin
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn

from dfqkit import checkpoint as ckpt
from dfqkit.checks import check_setup
from dfqkit.data import label_with_teacher
from dfqkit.engine import Engine
from dfqkit.errors import ConfigError
from dfqkit.generators.base import synthesize
from dfqkit.losses.base import Loss
from dfqkit.mixers import Mixer, NoMixer
from dfqkit.phases import (
    Calibration,
    ConstantImages,
    OneStepPerturbation,
    ReconstructionStage,
    noise_batch,
)
from dfqkit.ptq import check_transforms, quantize_with
from dfqkit.quant import EMAActQuantizer, QuantConfig, act_quantizers
from dfqkit.run import MIXED_PRECISION, Run, Schedule

logger = get_logger(__name__)

# GDFQ's optimizers (recipes bind their own through gin's torch.optim configurables)
GENERATOR_OPTIMIZER = functools.partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.999))
STUDENT_OPTIMIZER = functools.partial(
    torch.optim.SGD, lr=1e-4, momentum=0.9, nesterov=True, weight_decay=1e-4
)


@gin.configurable("train", module="dfqkit", denylist=["output_dir", "for_training"])
def build_run(
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
    trackers: Sequence[str] | str | None = "auto",
    max_nonfinite_in_a_row: int = 20,
    deterministic: bool = False,
    perturbation_eps: float = 0.0,
    constant_images: float = 0.0,
    observe_in_both_steps: bool = False,
    reconstruction: Any | None = None,
    transforms: Sequence[Any] = (),
    note: str = "",
    recipe: str = "",
    output_dir: str | Path,
    for_training: bool = True,
) -> Run:
    """Build every part of one DFQ experiment (the gin root ``train``).

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
            observed on the synthesized batches during the first ``calib_epochs``),
            ``"generator_unmixed"`` (the same epochs, on a batch synthesized with mixing off
            beside each training batch, never on the mixed training batches; needs a mixer;
            docs/methods/diversity.md, "Why the method's calibrated student starts low"),
            ``"noise"`` (the naive reference's ranges, observed on ``naive_batches`` Gaussian
            noise batches before training; ``calib_epochs`` is then unused) or ``"final"``
            (observed on the synthesized batches of the *last* ``calib_epochs`` epochs: PTQ on
            finished images, PSAQ-ViT; the student is evaluated only once its ranges exist).
            See :class:`~dfqkit.phases.Calibration`.
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
        checkpoint_keep: complete epoch checkpoints kept (the ``best`` one is kept besides).
        trackers: Accelerate trackers for ``accelerator.log`` (``"tensorboard"``, ``"wandb"``,
            ...); ``"auto"``: TensorBoard when it is installed, else none; ``None`` or ``[]``:
            none. Logs live under ``OUTPUT_DIR/logs``; the run directory stays the source of
            truth.
        max_nonfinite_in_a_row: a step whose loss or gradients are not finite is skipped on the
            device (:mod:`dfqkit.guard`); the run stops with
            :class:`~dfqkit.errors.NonFiniteLossError` before saving the epoch in which one
            optimizer skipped this many steps in a row.
        deterministic: force deterministic kernels (``torch.use_deterministic_algorithms``, no
            cuDNN autotuning, ``CUBLAS_WORKSPACE_CONFIG``); CPU runs are deterministic without
            it (docs/training.md, "Determinism").
        perturbation_eps: HAST's one-step perturbed sample in the student step (0: off;
            :class:`~dfqkit.phases.OneStepPerturbation`).
        constant_images: constant images added to every student batch, as a fraction of the
            batch (0: none; :class:`~dfqkit.phases.ConstantImages`, a GUESS beyond the papers:
            docs/methods/diversity.md).
        observe_in_both_steps: while ranges are observed, observe each batch in the student's
            forward of the generator step *and* in the observing forward (AdaSG/AdaDFQ's
            released code: two range updates per calibration iteration).
        reconstruction: a post-training stage run after the last epoch, unit by unit, with a
            checkpoint after each (``@ptq.BlockReconstruction()``, Genie-M); its result is
            reported as both best and last. Needs ``warmup_epochs >= epochs``.
        transforms: data-free transforms applied around quantization, to the student and to
            the naive reference alike (:func:`dfqkit.ptq.quantize_with`): e.g.
            ``[@ptq.CrossLayerEqualization(), @ptq.BiasCorrection()]`` (docs/ptq.md). Empty
            (the default): the student is ``quantize_`` of the teacher's copy, nothing else.
        note: one line the finished run prints under its summary and records in
            ``metrics.json`` (e.g. the command that compares it with another recipe); empty:
            none.
        recipe: the recipe's name, recorded in the metrics (the run directory layer sets it).
        output_dir: the run directory (set by the caller, not by gin).
        for_training: ``False`` builds the run to inspect, export or benchmark it: no
            trackers are started.

    Returns:
        The :class:`~dfqkit.run.Run`, with its loop state at the start (epoch 0); load a
        checkpoint into it with :meth:`Run.load`.
    """
    _check_instances(
        teacher=teacher,
        data=data,
        generator=generator,
        mixer=mixer,
        quant=quant,
        reconstruction=reconstruction,
        **{f"losses[{i}]": loss for i, loss in enumerate(losses)},
    )
    transforms = check_transforms(transforms)
    if not isinstance(note, str) or "\n" in note:
        raise ConfigError(f"train.note must be a one-line string, got {note!r}")
    schedule = Schedule(
        epochs=epochs,
        iters_per_epoch=iters_per_epoch,
        batch_size=batch_size,
        warmup_epochs=warmup_epochs,
        eval_every=eval_every,
        early_stopping_patience=early_stopping_patience,
        lr_milestones=tuple(lr_milestones),
        lr_gamma=lr_gamma,
        generator_lr_schedule=generator_lr_schedule,
        generator_lr_warmup_iters=generator_lr_warmup_iters,
        naive_batches=naive_batches,
        max_nonfinite_in_a_row=max_nonfinite_in_a_row,
        checkpoint_keep=checkpoint_keep,
        seed=seed,
    )
    _check_settings(
        schedule,
        calibration=calibration,
        calib_epochs=calib_epochs,
        mixed_precision=mixed_precision,
        perturbation_eps=perturbation_eps,
        constant_images=constant_images,
        deterministic=deterministic,
        reconstruction=reconstruction,
    )
    out = Path(output_dir)
    log_with = resolve_trackers(trackers) if for_training else []
    acc = _accelerator(out, mixed_precision, log_with)
    if log_with:
        config = {"recipe": recipe, "seed": seed, "epochs": epochs, "batch_size": batch_size}
        _start_trackers(acc, out, log_with, config)
    mixer = NoMixer() if mixer is None else mixer
    teacher, student, generator, mixer, data, example, synthesis_s = _models(
        acc, teacher, data, generator, mixer, losses, quant, schedule, transforms, reconstruction
    )
    _check_observed(student, calibration, calib_epochs)
    _check_unmixed(calibration, mixer, observe_in_both_steps)
    if constant_images > 0 and example is not None and len(data.mean) != example.shape[1]:
        raise ConfigError(
            f"train.constant_images needs the teacher input's per-channel mean and std: the "
            f"data has {len(data.mean)} channels, the teacher's input {example.shape[1]}"
        )
    updates = calib_epochs * iters_per_epoch * (2 if observe_in_both_steps else 1)
    warn_inflated_ranges(student, naive=naive_batches, run=updates if calibration != "noise" else 0)
    stage = None
    if reconstruction is not None:
        stage = ReconstructionStage(reconstruction, teacher, student, example)
    gen_opt, student_opt, generator, student, state = _optimizers(
        acc, generator, mixer, student, generator_optimizer, student_optimizer
    )
    state.add_seconds("synthesis", synthesis_s)  # a resumed run loads the first run's figure
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
        perturbation=OneStepPerturbation(perturbation_eps) if perturbation_eps > 0 else None,
        constant_images=(
            ConstantImages(constant_images, data.mean, data.std) if constant_images > 0 else None
        ),
        observe_twice=observe_in_both_steps,
        observe_unmixed=calibration == "generator_unmixed",
    )
    return Run(
        output_dir=out,
        recipe=recipe,
        note=note,
        schedule=schedule,
        accelerator=acc,
        teacher=teacher,
        student=student,
        generator=generator,
        mixer=mixer,
        losses=list(losses),
        quant=quant,
        data=data,
        engine=engine,
        generator_optimizer=gen_opt,
        student_optimizer=student_opt,
        calibration=Calibration(calibration, epochs=calib_epochs, total_epochs=epochs),
        reconstruction=stage,
        transforms=transforms,
        state=state,
        trackers=log_with,
        example=example,
    )


def _start_trackers(acc, out: Path, log_with: list, config: dict[str, Any]) -> None:
    acc.project_configuration.logging_dir = str(out / "logs")
    acc.init_trackers("dfqkit", config=config)
    _check_trackers(acc, log_with)


def ema_inflation(momentum: float, updates: int) -> float:
    """The range GDFQ's bias-corrected EMA holds after ``updates`` updates of a constant batch
    statistic 1.0 (:class:`~dfqkit.quant.EMAActQuantizer`): 1.0 once it has settled."""
    value = 0.0
    for t in range(1, updates + 1):
        value = (momentum * value + (1.0 - momentum)) / (1.0 - momentum**t)
    return value


def warn_inflated_ranges(student: nn.Module, *, naive: int, run: int) -> None:
    """Warn at start-up when a bias-corrected EMA quantizer (GDFQ's) will be frozen before it
    settles: its range is then a multiple of the batch statistics."""
    ema = [
        q for q in act_quantizers(student) if isinstance(q, EMAActQuantizer) and q.bias_correction
    ]
    if not ema:
        return
    m = ema[0].momentum
    for what, updates in (("the naive reference's noise batches", naive), ("calibration", run)):
        factor = ema_inflation(m, updates)
        if updates and factor > 1.05:
            logger.warning(
                f"{len(ema)} activation quantizers use GDFQ's bias-corrected EMA "
                f"(bias_correction=True, momentum {m}) and {what} give them {updates} updates: "
                f"their ranges will be frozen at about {factor:.3g}x the observed statistics "
                f"(it settles after about 150 updates); give more updates "
                "(train.naive_batches, train.calib_epochs x ITERS_PER_EPOCH) or set "
                f"quantizers.{type(ema[0]).__name__}.bias_correction = False "
                "(docs/quantization.md)"
            )


def _check_unmixed(calibration: str, mixer: nn.Module, observe_in_both_steps: bool) -> None:
    """``'generator_unmixed'`` needs a mixer that mixes, with an unmixed form, and observes
    nothing else."""
    if calibration != "generator_unmixed":
        return
    module = getattr(mixer, "module", mixer)
    if isinstance(module, NoMixer):
        raise ConfigError(
            "train.calibration = 'generator_unmixed' observes ranges on batches synthesized "
            "with mixing off, but this run mixes nothing (train.mixer is NoMixer): use "
            "'generator'"
        )
    if module.stage == "cond" and type(module).unmixed is Mixer.unmixed:
        raise ConfigError(
            f"train.calibration = 'generator_unmixed' needs the mixer's unmixed form, and "
            f"{type(module).__name__} (a conditioning mixer) defines no unmixed(): use "
            "'generator'"
        )
    if observe_in_both_steps:
        raise ConfigError(
            "train.observe_in_both_steps = True observes the (mixed) training batches, "
            "train.calibration = 'generator_unmixed' only unmixed ones: set one of them"
        )


def _check_observed(student: nn.Module, calibration: str, calib_epochs: int) -> None:
    """Activation quantizers that must observe a batch get at least one epoch to do it."""
    if calib_epochs == 0 and calibration != "noise" and act_quantizers(student):
        raise ConfigError(
            f"train.calib_epochs = 0 with train.calibration = {calibration!r}: the student's "
            f"{len(act_quantizers(student))} activation quantizers would never observe a batch, "
            "so they would have no range; set train.calib_epochs >= 1, or "
            "train.calibration = 'noise'"
        )


def _models(
    acc, teacher, data, generator, mixer, losses, quant, schedule: Schedule, transforms, stage
):
    """The teacher, generator and mixer on the device, checked against each other; the mixer's
    teacher-dependent parts bound; the student quantized from a copy of the teacher (with the
    data-free transforms around it); evaluation data labelled (or made) by the teacher where it
    asks for it."""
    device = acc.device
    teacher = teacher.to(device).eval().requires_grad_(False)
    generator, mixer = generator.to(device), mixer.to(device)
    if getattr(data, "prepare", None) is not None:  # a set made from the teacher
        data = data.prepare(teacher, device)
    elif getattr(data, "labelled_by", "dataset") == "teacher":
        data = label_with_teacher(data, teacher, device)
    check_setup(
        teacher=teacher,
        data=data,
        generator=generator,
        mixer=mixer,
        losses=losses,
        batch_size=schedule.batch_size,
        device=device,
        trains_student=schedule.trains_student,
    )
    example = noise_batch(data, 2, device)
    # the student first (it draws no random numbers), so that what is checked on it fails
    # before a synthetic set is synthesized
    student = quantize_with(copy.deepcopy(teacher), quant, example, transforms)
    student = student.requires_grad_(True).eval()
    if stage is not None:
        try:
            stage.check(student)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    t0 = time.perf_counter()
    for part in (generator, mixer):  # teacher-dependent parts are built before the optimizers
        if hasattr(part, "bind"):
            part.bind(teacher=teacher, generator=generator, example=example)
    synthesis_s = time.perf_counter() - t0  # a synthetic set's stage one (or its cache read)
    return teacher, student, generator, mixer, data, example, synthesis_s


def _optimizers(acc, generator, mixer, student, generator_optimizer, student_optimizer):
    """Both optimizers, the parts prepared by Accelerate, and the loop state registered for
    checkpointing."""
    if acc.num_processes > 1 and generator.trainable:
        _freeze_unused(generator, mixer, acc.device)
    gen_params = [p for m in (generator, mixer) for p in m.parameters() if p.requires_grad]
    gen_opt = generator_optimizer(gen_params) if gen_params and generator.trainable else None
    student_opt = student_optimizer_groups(student_optimizer, student)
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
    return gen_opt, student_opt, generator, student, state


def _check_instances(**parts: Any) -> None:
    """A part bound as ``@kind.Name`` (the class or factory itself) instead of
    ``@kind.Name()`` (an instance) is named, with the fix."""
    for name, part in parts.items():
        if inspect.isclass(part) or inspect.isfunction(part):
            kind = part.__module__.split(".")[1] if part.__module__.startswith("dfqkit.") else ""
            ref = f"@{kind}.{part.__name__}" if kind else f"@{part.__name__}"
            raise ConfigError(
                f"train.{name} is {ref} — the {'class' if inspect.isclass(part) else 'function'} "
                f"itself, not an instance: write {ref}() (with parentheses) so gin builds one"
            )


def _check_settings(
    schedule: Schedule,
    *,
    calibration: str,
    calib_epochs: int,
    mixed_precision: str,
    perturbation_eps: float,
    constant_images: float,
    deterministic: bool,
    reconstruction: Any,
) -> None:
    """Settings that depend on each other, checked before anything is built."""
    if not isinstance(calib_epochs, int) or isinstance(calib_epochs, bool) or calib_epochs < 0:
        raise ConfigError(f"train.calib_epochs must be an integer >= 0, got {calib_epochs!r}")
    epochs, warmup = schedule.epochs, schedule.warmup_epochs
    if calibration == "final" and warmup < epochs - calib_epochs:
        raise ConfigError(
            f"train.calibration = 'final' observes ranges in the last calib_epochs={calib_epochs} "
            f"of epochs={epochs}, so the student cannot train before epoch "
            f"{epochs - calib_epochs}: set train.warmup_epochs >= {epochs - calib_epochs} "
            f"(got {warmup})"
        )
    if not isinstance(perturbation_eps, int | float) or perturbation_eps < 0:
        raise ConfigError(f"train.perturbation_eps must be a number >= 0, got {perturbation_eps!r}")
    if (
        not isinstance(constant_images, int | float)
        or isinstance(constant_images, bool)
        or not 0 <= constant_images <= 1
    ):
        raise ConfigError(
            f"train.constant_images must be a number in [0, 1] (the fraction of the student "
            f"batch added as constant images; 0: none), got {constant_images!r}"
        )
    if not isinstance(deterministic, bool):
        raise ConfigError(f"train.deterministic must be True or False, got {deterministic!r}")
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if mixed_precision not in MIXED_PRECISION:
        raise ConfigError(
            f"train.mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}"
        )
    if reconstruction is not None and warmup < epochs:
        raise ConfigError(
            f"train.reconstruction is a post-training stage, so the student must not train "
            f"before it: set train.warmup_epochs >= train.epochs={epochs} (got {warmup})"
        )


def _accelerator(out: Path, mixed_precision: str, log_with: list[str]) -> Accelerator:
    # Each process observes its own batches; ranges are merged by sync_quantizers, not by DDP's
    # per-forward buffer broadcast from rank 0.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    # a process may build several runs (bench, tests, notebooks): each sets its own precision
    AcceleratorState._reset_state()
    # Several processes without a GPU (torchrun on CPU): Accelerate forms the gloo group only
    # when told the run is on the CPU; with a GPU it picks the device itself.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(
        cpu=multi_cpu,
        mixed_precision=mixed_precision,
        project_dir=str(out),
        kwargs_handlers=[ddp],
        log_with=log_with or None,
    )


def resolve_trackers(trackers: Sequence[str] | str | None) -> list[str]:
    """``train.trackers`` as a list of Accelerate tracker names (``"auto"``: TensorBoard when
    it is installed)."""
    if trackers is None:
        return []
    if trackers == "auto":
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    names = [trackers] if isinstance(trackers, str) else list(trackers)
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    unknown = [n for n in names if n not in LOGGER_TYPE_TO_CLASS]
    if unknown:
        raise ConfigError(
            f"train.trackers: unknown tracker(s) {unknown}; Accelerate knows "
            f"{sorted(LOGGER_TYPE_TO_CLASS)}"
        )
    return names


def _check_trackers(acc: Accelerator, wanted: list[str]) -> None:
    """A tracker that was asked for but did not start (Accelerate drops one whose package is
    missing, with a warning) is an error."""
    if not acc.is_main_process:
        return
    started = {getattr(t, "name", "") for t in acc.trackers}
    missing = [name for name in wanted if name not in started]
    if missing:
        raise ConfigError(
            f"train.trackers = {wanted}: {', '.join(missing)} could not start (is its package "
            f"installed? pip install {' '.join(missing)}); or set train.trackers = None"
        )


def _freeze_unused(generator: nn.Module, mixer: nn.Module, device: torch.device) -> None:
    """Stop the generator's parameters that this configuration never uses from requiring
    gradients (e.g. its label embedding when a ``cond`` mixer provides the conditioning), so
    DistributedDataParallel does not wait for their gradients. One probe forward, with the RNG
    state and BN statistics left untouched."""
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


def student_optimizer_groups(factory: Callable[..., torch.optim.Optimizer], student: nn.Module):
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
