"""A :class:`Run` holds every part of one experiment; its :class:`Schedule` says how long and
when each part trains. Built only by :func:`dfqkit.build.build_run` (the gin root ``train``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from dfqkit import checkpoint as ckpt
from dfqkit.engine import Engine
from dfqkit.errors import ConfigError
from dfqkit.evaluate import evaluate
from dfqkit.losses.base import Loss
from dfqkit.quant import QuantConfig

MIXED_PRECISION = ("no", "bf16", "fp16")
GENERATOR_SCHEDULES = ("multistep", "cosine")
WHICH = ("best", "last")


@dataclass(frozen=True)
class Schedule:
    """The budget and the learning-rate schedule of a run (``train.*`` bindings)."""

    epochs: int
    iters_per_epoch: int
    batch_size: int
    warmup_epochs: int
    eval_every: int
    early_stopping_patience: int | None
    lr_milestones: tuple[int, ...]
    lr_gamma: float
    generator_lr_schedule: str
    generator_lr_warmup_iters: int
    naive_batches: int
    max_nonfinite_in_a_row: int
    checkpoint_keep: int
    seed: int

    def __post_init__(self) -> None:
        for name, low in (
            ("epochs", 1),
            ("iters_per_epoch", 1),
            ("batch_size", 1),
            ("eval_every", 1),
            ("warmup_epochs", 0),
            ("generator_lr_warmup_iters", 0),
            ("naive_batches", 1),
            ("max_nonfinite_in_a_row", 1),
            ("checkpoint_keep", 1),
            ("seed", 0),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"train.{name} must be an integer >= {low}, got {value!r}")
        patience = self.early_stopping_patience
        if patience is not None and (not isinstance(patience, int) or patience < 1):
            raise ConfigError(
                f"train.early_stopping_patience must be None or an integer >= 1, got {patience!r}"
            )
        if self.generator_lr_schedule not in GENERATOR_SCHEDULES:
            raise ConfigError(
                f"train.generator_lr_schedule must be one of {GENERATOR_SCHEDULES}, "
                f"got {self.generator_lr_schedule!r}"
            )

    @property
    def trains_student(self) -> bool:
        return self.warmup_epochs < self.epochs

    def trains_student_in(self, epoch: int) -> bool:
        """Whether the student takes steps in (0-based) ``epoch``."""
        return epoch >= self.warmup_epochs

    def decay(self, epoch: int) -> float:
        """The multi-step factor of (0-based) ``epoch``: ``lr_gamma ** #(milestones <= epoch)``."""
        return self.lr_gamma ** sum(epoch >= m for m in self.lr_milestones)

    def cosine(self, step: int) -> float:
        """The generator's cosine factor at iteration ``step``: linear warm-up over
        ``generator_lr_warmup_iters``, then cosine decay from 1 to 0 at the last iteration."""
        warmup, total = self.generator_lr_warmup_iters, self.epochs * self.iters_per_epoch
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@dataclass(eq=False)
class Run:
    """Every part of one experiment, built and checked, ready for the loop
    (:func:`dfqkit.train.fit`), an export, a benchmark or a diagnosis.

    ``student`` and ``generator`` are as Accelerate prepared them (wrapped under several
    processes); :attr:`student_module` is the plain student. ``state`` is the loop state saved
    with every checkpoint; :meth:`load` restores a checkpoint into every part.
    """

    output_dir: Path
    recipe: str
    schedule: Schedule
    accelerator: Accelerator
    teacher: nn.Module
    student: nn.Module
    generator: nn.Module
    mixer: nn.Module
    losses: list[Loss]
    quant: QuantConfig
    data: Any
    engine: Engine
    generator_optimizer: torch.optim.Optimizer | None
    student_optimizer: torch.optim.Optimizer
    calibration: Any
    reconstruction: Any | None
    #: the data-free transforms around quantization (``train.transforms``), for the reference
    transforms: list[Any]
    state: ckpt.TrainState
    trackers: list[str]
    example: torch.Tensor
    #: a line the finished run prints under its summary (``train.note``)
    note: str = ""
    base_lrs: list[list[float]] = field(init=False)
    #: ``(which, epochs done)`` of the checkpoint :meth:`load` restored, else ``None``
    loaded: tuple[str, int] | None = field(default=None, init=False)
    _teacher_test: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.base_lrs = [[g["lr"] for g in opt.param_groups] for opt in self.optimizers]

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.generator_optimizer, self.student_optimizer) if o is not None]

    @property
    def student_module(self) -> nn.Module:
        """The student without any process wrapper."""
        return self.accelerator.unwrap_model(self.student)

    @functools.cached_property
    def loaders(self) -> dict[str, Any]:
        """The prepared evaluation loaders, ``{"val", "test"}`` (built on first use)."""
        return {
            s: self.accelerator.prepare(self.data.loader(s, batch_size=256))
            for s in ("val", "test")
        }

    def teacher_test(self, *, keep_rng: bool = True) -> dict[str, Any]:
        """The teacher's evaluation on the test loader, with its top-1 ``predictions`` (this
        process's shard, loader order), computed once: every epoch's agreement compares with
        the same predictions on the same fixed images.

        Iterating a loader draws its base seed from the global RNG. With ``keep_rng`` (a lazy
        first use, e.g. after a resume) the draw is undone, so a resumed run samples what an
        uninterrupted one does; the references pass ``False`` (their evaluation has always
        drawn it)."""
        if self._teacher_test is None:
            with torch.random.fork_rng(devices=[], enabled=keep_rng):
                self._teacher_test = evaluate(
                    self.teacher,
                    self.loaders["test"],
                    device=self.device,
                    accelerator=self.accelerator,
                    predictions=True,
                )
        return self._teacher_test

    def evaluate(self, model: nn.Module, split: str) -> dict[str, Any]:
        """``model`` on the ``"val"`` or ``"test"`` loader; on test, also its agreement with the
        teacher's (cached) predictions."""
        teacher = self.teacher_test()["predictions"] if split == "test" else None
        return evaluate(
            model,
            self.loaders[split],
            teacher=teacher,
            device=self.device,
            accelerator=self.accelerator,
        )

    def set_epoch_learning_rates(self, epoch: int) -> None:
        """Both optimizers at ``base lr · decay(epoch)`` (the multi-step schedule)."""
        decay = self.schedule.decay(epoch)
        for opt, lrs in zip(self.optimizers, self.base_lrs, strict=True):
            for group, lr in zip(opt.param_groups, lrs, strict=True):
                group["lr"] = lr * decay

    def set_generator_iteration_lr(self, step: int) -> None:
        """The generator at ``base lr · cosine(step)`` when its schedule is per iteration."""
        if self.generator_optimizer is None or self.schedule.generator_lr_schedule != "cosine":
            return
        factor = self.schedule.cosine(step)
        for group, lr in zip(self.generator_optimizer.param_groups, self.base_lrs[0], strict=True):
            group["lr"] = lr * factor

    def checkpoint_path(self, which: str = "last") -> Path | None:
        """The complete checkpoint ``which`` (``"best"`` or ``"last"``), or ``None``."""
        if which not in WHICH:
            raise ConfigError(f"which must be one of {WHICH}, got {which!r}")
        if which == "best":
            return ckpt.best_checkpoint(self.output_dir)
        return ckpt.latest_checkpoint(self.output_dir)

    def load(self, which: str = "last") -> Path | None:
        """Restore checkpoint ``which`` into every part (model weights, optimizers, RNG states,
        loop state); returns its path, or ``None`` when the run has no such checkpoint."""
        path = self.checkpoint_path(which)
        if path is not None:
            ckpt.load_checkpoint(self.accelerator, path, self.output_dir / "config.gin")
            self.loaded = (which, ckpt.checkpoint_epoch(path))
        return path
