"""The method-specific phases a run holds as parts, so the loop has no branch per method.

* :class:`Calibration` — where the student's activation ranges come from
  (``train.calibration``): observed on the synthesized batches of the first epochs (GDFQ), on
  unmixed synthesized batches of the first epochs, on Gaussian noise before training (the naive
  reference's ranges), or on the synthesized batches of the last epochs (PTQ on finished images,
  PSAQ-ViT).
* :class:`OneStepPerturbation` — HAST's perturbed copy of every student batch
  (``train.perturbation_eps``), applied by the :class:`~dfqkit.engine.Engine`.
* :class:`ConstantImages` — constant images added to every student batch
  (``train.constant_images``), applied by the :class:`~dfqkit.engine.Engine`.
* :class:`ReconstructionStage` — a post-training stage (``train.reconstruction``, Genie-M's
  block reconstruction) run unit by unit after the last epoch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dfqkit.bindings import suggest
from dfqkit.errors import ConfigError
from dfqkit.quant import act_quantizers, set_quant_mode
from dfqkit.step import Step, SynthBatch
from dfqkit.taps import cat_taps, no_grad_params

CALIBRATIONS = ("generator", "generator_unmixed", "noise", "final")


def noise_batch(data, batch_size: int, device: torch.device) -> torch.Tensor:
    """Gaussian noise in the teacher's normalized input space, ``(b, c, s, s)``."""
    return torch.randn(batch_size, data.channels, data.image_size, data.image_size, device=device)


class Calibration:
    """Where the student's activation ranges come from.

    Args:
        source: ``"generator"`` (observed on the synthesized batches of the first ``epochs``
            epochs), ``"generator_unmixed"`` (the same, on a batch synthesized with mixing off
            beside each training batch: one more generator forward per calibration iteration;
            docs/methods/diversity.md), ``"noise"`` (the naive reference's ranges, observed on
            Gaussian noise before training; the student never observes) or ``"final"``
            (observed on the synthesized batches of the last ``epochs`` epochs; the student is
            evaluated only once its ranges exist).
        epochs: ``train.calib_epochs``.
        total_epochs: ``train.epochs``.
    """

    def __init__(self, source: str, *, epochs: int, total_epochs: int) -> None:
        if source not in CALIBRATIONS:
            raise ConfigError(
                f"train.calibration must be one of {CALIBRATIONS}, got {source!r}."
                + suggest(str(source), CALIBRATIONS)
            )
        self.source, self.epochs, self.total_epochs = source, epochs, total_epochs

    def observes(self, epoch: int) -> bool:
        """Whether the student's activation quantizers observe in (0-based) ``epoch``."""
        if self.source in ("generator", "generator_unmixed"):
            return epoch < self.epochs
        return self.source == "final" and epoch >= self.total_epochs - self.epochs

    def ready(self, epochs_done: int) -> bool:
        """Whether the student has its ranges after ``epochs_done`` epochs (may be evaluated)."""
        return self.source != "final" or epochs_done > self.total_epochs - self.epochs

    def start_from(self, naive: nn.Module, student: nn.Module) -> None:
        """Before training: a ``"noise"`` student takes the naive reference's ranges."""
        if self.source != "noise":
            return
        for src, dst in zip(act_quantizers(naive), act_quantizers(student), strict=True):
            dst.load_state_dict(src.state_dict())

    def __repr__(self) -> str:
        return f"Calibration({self.source!r}, epochs={self.epochs})"


class OneStepPerturbation:
    """HAST's perturbed sample in the student step: the student loss is also computed on
    ``x' = x + eps · sign(∇x L_student(x))`` (the gradient taken through the unwrapped
    student, without weight gradients; the teacher re-run on ``x'``) and the two are summed,
    as one forward of the student on ``[x; x']``.

    Args:
        eps: the step size (``train.perturbation_eps``, > 0).
    """

    #: the student loss over ``[x; x']`` is a mean; this factor makes it ``L(x) + L(x')``
    loss_scale = 2.0

    def __init__(self, eps: float) -> None:
        self.eps = float(eps)

    def __call__(self, engine, batch: SynthBatch, teacher_logits, teacher_taps, epoch: int):
        """``[x; x']``, and the teacher's logits and the student-read taps on both halves."""
        acc = engine.acc
        images = batch.images.detach().requires_grad_(True)
        student = acc.unwrap_model(engine.student)
        with acc.autocast(), no_grad_params(engine.student_params), engine.student_taps:
            logits = student(images)
            probe = Step(batch.replace(images=images), teacher_logits, logits,
                         teacher_taps=teacher_taps, student_taps=engine.student_taps.collect(),
                         epoch=epoch)  # fmt: skip
            loss = sum(loss_fn(probe) for loss_fn in engine.student_losses)
        (grad,) = torch.autograd.grad(loss, images)
        adv = (images + self.eps * grad.sign()).detach()
        with torch.no_grad(), acc.autocast(), engine.teacher_taps:
            adv_logits = engine.teacher(adv)
        adv_taps = engine.teacher_taps.collect()
        both = {k: cat_taps(v, adv_taps[k]) for k, v in teacher_taps.items()}

        def twice(x):
            return None if x is None else torch.cat([x, x])

        doubled = SynthBatch(
            labels=twice(batch.labels),
            targets=twice(batch.targets),
            images=torch.cat([batch.images, adv]),
            mix={k: twice(v) for k, v in batch.mix.items() if isinstance(v, torch.Tensor)},
        )
        return doubled, torch.cat([teacher_logits, adv_logits.detach()]), both

    def __repr__(self) -> str:
        return f"OneStepPerturbation(eps={self.eps})"


class ConstantImages:
    """Constant images added to every student batch (``train.constant_images``; GUESS, beyond
    every paper implemented here; docs/methods/diversity.md, "A remedy for the background").

    ``n = max(1, round(fraction · b))`` images, each filled with one value per channel drawn
    uniformly from the teacher's valid pixel range (raw pixels in ``[0, 1]``, normalized with
    the evaluation data's mean and std), are appended to the student step's batch; the teacher
    is run on them (its logits and the taps the student losses read), and their targets are the
    teacher's own probabilities. Synthesized images have no flat regions, so without them no
    loss sees how the student answers a constant background, and a weight moving across a
    rounding boundary can change that answer for every real image at once.

    Args:
        fraction: the number of constant images relative to the batch (> 0).
        mean, std: per-channel normalization of the teacher's input.
    """

    loss_scale = 1.0

    def __init__(self, fraction: float, mean: Sequence[float], std: Sequence[float]) -> None:
        self.fraction = float(fraction)
        mean = torch.as_tensor(mean, dtype=torch.float32)
        std = torch.as_tensor(std, dtype=torch.float32)
        self.low, self.high = (0.0 - mean) / std, (1.0 - mean) / std

    def count(self, batch_size: int) -> int:
        return max(1, round(self.fraction * batch_size))

    def images(self, like: torch.Tensor) -> torch.Tensor:
        """``(n, c, h, w)`` constant images shaped like the batch ``like``."""
        b, c, h, w = like.shape
        low, high = self.low.to(like.device), self.high.to(like.device)
        u = torch.rand(self.count(b), c, 1, 1, device=like.device)
        values = low.view(1, c, 1, 1) + u * (high - low).view(1, c, 1, 1)
        return values.expand(-1, -1, h, w).to(like.dtype).contiguous()

    def __call__(self, engine, batch: SynthBatch, teacher_logits, teacher_taps, epoch: int):
        """The batch with the constant images appended, and the teacher's logits and the
        student-read taps on all of it."""
        const = self.images(batch.images)
        n = const.shape[0]
        taps = teacher_taps
        with torch.no_grad(), engine.acc.autocast():
            if teacher_taps:  # the taps a student loss reads, on the constant images too
                with engine.teacher_taps:
                    const_logits = engine.teacher(const)
                const_taps = engine.teacher_taps.collect()
                taps = {k: cat_taps(v, const_taps[k]) for k, v in teacher_taps.items()}
            else:
                const_logits = engine.teacher(const)
        probs = const_logits.float().softmax(-1)
        targets = batch.targets
        if targets is not None:
            targets = torch.cat([targets, probs.to(targets.dtype)])

        def pad(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, x.new_zeros((n, *x.shape[1:]))])

        extended = SynthBatch(
            labels=torch.cat([batch.labels, probs.argmax(-1).to(batch.labels.dtype)]),
            targets=targets,
            images=torch.cat([batch.images, const]),
            mix={k: pad(v) for k, v in batch.mix.items() if isinstance(v, torch.Tensor)},
        )
        return extended, torch.cat([teacher_logits, const_logits]), taps

    def __repr__(self) -> str:
        return f"ConstantImages(fraction={self.fraction})"


class ReconstructionStage:
    """A post-training reconstruction (``train.reconstruction``) and the student's units.

    Args:
        reconstruction: the method (``@ptq.BlockReconstruction()``).
        teacher, student: the unwrapped models (the student never trains before the stage).
        example: a small input batch, to find the units in execution order.
    """

    def __init__(
        self, reconstruction: Any, teacher: nn.Module, student: nn.Module, example: torch.Tensor
    ) -> None:
        try:
            reconstruction.check(student)
            self.units = reconstruction.units(teacher, student, example)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        self.reconstruction = reconstruction

    def pending(self, units_done: int) -> bool:
        return units_done < len(self.units)

    def calibration_images(self, run) -> torch.Tensor:
        """The images every unit is reconstructed on (drawn once from the run's source)."""
        set_quant_mode(run.student_module, "frozen")
        return self.reconstruction.calibration_images(
            run.generator, run.mixer, run.schedule.batch_size, run.device, run.schedule.seed
        )

    def reconstruct(self, run, index: int, images: torch.Tensor) -> tuple[float, float]:
        """Reconstruct unit ``index``; returns its mean loss (one host read) and seconds."""
        t0 = time.perf_counter()
        loss = self.reconstruction.reconstruct_unit(
            run.teacher,
            run.student_module,
            self.units[index],
            images,
            seed=run.schedule.seed * 100_003 + index,
        )
        return float(loss), time.perf_counter() - t0

    def __repr__(self) -> str:
        return f"ReconstructionStage({self.reconstruction!r}, units={len(self.units)})"
