"""One training iteration of the generic DFQ loop (shared by the trainer and the speed bench).

Per iteration: sample z and labels → generator (+ mixer) → teacher forward with the taps some
loss declared → generator step; then the student on the same, detached batch: a training step
after warm-up, an observation-only forward (no autograd graph) while activation ranges are being
calibrated (with ``observe_unmixed``: on a separate batch synthesized with mixing off, before the
generator step), nothing otherwise. The teacher's logits and taps from the generator step are
reused by the student step, the teacher has no weight gradients, and no value is moved to the
host.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dfqkit.generators.base import synthesize
from dfqkit.guard import StepGuard
from dfqkit.losses.base import Loss
from dfqkit.quant import set_quant_mode
from dfqkit.step import Step, SynthBatch
from dfqkit.taps import Taps, detach_taps, no_grad_params


@dataclass(frozen=True)
class Phase:
    """What an epoch does: train the generator, observe activation ranges, train the student."""

    generator: bool
    observe: bool
    student: bool


class Engine:
    """Holds the parts of one run and performs iterations.

    Args:
        accelerator: the run's ``accelerate.Accelerator``.
        teacher: frozen full-precision model (eval mode, no parameter gradients).
        student: quantized model (prepared; BN layers in eval mode).
        generator, mixer: the image source (generator possibly prepared/wrapped).
        losses: every loss; split here by ``side``.
        generator_optimizer: optimizer over generator + mixer parameters, or ``None``.
        student_optimizer: optimizer over the student's parameters.
        batch_size: per-process batch size.
        perturbation: a callable that replaces the student step's batch, teacher logits and
            taps by a perturbed version (HAST: :class:`~dfqkit.phases.OneStepPerturbation`),
            with a ``loss_scale`` for the student loss; ``None``: none.
        constant_images: a callable of the same form applied before ``perturbation``
            (:class:`~dfqkit.phases.ConstantImages`); ``None``: none.
        observe_twice: observe each calibration batch in the generator step's student forward
            too (AdaSG/AdaDFQ's released code).
        observe_unmixed: observe ranges only on a separate batch synthesized with mixing off
            (``train.calibration = 'generator_unmixed'``), never on the training batches.
    """

    def __init__(
        self,
        *,
        accelerator,
        teacher: nn.Module,
        student: nn.Module,
        generator: nn.Module,
        mixer: nn.Module,
        losses: Sequence[Loss],
        generator_optimizer: torch.optim.Optimizer | None,
        student_optimizer: torch.optim.Optimizer,
        batch_size: int,
        example: torch.Tensor | None = None,
        perturbation: Callable | None = None,
        constant_images: Callable | None = None,
        observe_twice: bool = False,
        observe_unmixed: bool = False,
    ) -> None:
        self.acc = accelerator
        # a loss of weight 0 is switched off: not computed, and its taps are not installed
        losses = [loss for loss in losses if loss.weight != 0.0]
        self.teacher, self.student = teacher, student
        self.generator, self.mixer = generator, mixer
        self.gen_losses = [loss for loss in losses if loss.side == "generator"]
        self.student_losses = [loss for loss in losses if loss.side == "student"]
        self.gen_opt, self.student_opt = generator_optimizer, student_optimizer
        self.student_in_gen_step = any(loss.needs_student for loss in self.gen_losses)
        self.student_params = [p for p in student.parameters() if p.requires_grad]
        self.batch_size = batch_size
        self.perturbation = perturbation
        self.constant_images = constant_images
        mixer_module = getattr(mixer, "module", mixer)
        self.mixer_module = mixer_module
        readers = [*losses, mixer_module]
        teacher_needs = set().union(*(r.needs for r in readers))
        # teacher taps that the student step reads: only those are kept past the generator step
        self.student_reads = set().union(*(loss.needs for loss in self.student_losses))
        student_needs = set().union(*(loss.needs_student_taps for loss in losses))
        stage_parts = {
            r.stage_parts for r in readers if "stages" in r.needs and r.stage_parts is not None
        }
        self.teacher_taps = Taps(
            teacher,
            teacher_needs,
            model_name="the teacher",
            stage_parts=stage_parts,
            example=example,
        )
        self.student_taps = Taps(student, student_needs, model_name="the student", example=example)
        self.loss_sums: dict[str, torch.Tensor] = {}
        self.loss_counts: dict[str, torch.Tensor] = {}
        self.last_batch: SynthBatch | None = None
        # non-finite losses skip their step on the device (dfqkit.guard); under fp16 the loss
        # scaler already skips overflowing gradients, so only the loss is checked then
        check_grads = getattr(accelerator, "scaler", None) is None
        reduce = _min_over_processes if accelerator.num_processes > 1 else None
        # a skipped step also puts back the buffers its forward changed: the generator's BN
        # statistics (and the student's ranges when it runs in the generator step), the
        # student's observed ranges
        gen_modules = [generator, mixer_module] + ([student] if self.student_in_gen_step else [])
        self.guards = {
            side: StepGuard(
                opt, accelerator.device, check_grads=check_grads, reduce=reduce, modules=modules
            )  # fmt: skip
            for side, opt, modules in (
                ("generator", generator_optimizer, gen_modules),
                ("student", student_optimizer, [student]),
            )
            if opt is not None
        }
        self.observe_twice = bool(observe_twice)
        self.observe_unmixed = bool(observe_unmixed)

    @property
    def generator_trains(self) -> bool:
        gen = getattr(self.generator, "module", self.generator)
        return bool(gen.trainable and self.gen_losses and self.gen_opt is not None)

    def _accumulate(self, key: str, value: torch.Tensor, count: torch.Tensor | None = None) -> None:
        """Add ``value`` (a sum over ``count`` items; default one item) to the epoch's mean of
        ``key``; a non-finite value is left out."""
        value = value.detach().float()
        finite = torch.isfinite(value)
        value = torch.where(finite, value, 0.0)
        count = finite.float() if count is None else torch.where(finite, count.float(), 0.0)
        if key in self.loss_sums:
            self.loss_sums[key] += value
            self.loss_counts[key] += count
        else:
            self.loss_sums[key] = value.clone()
            self.loss_counts[key] = count.clone()

    @torch.no_grad()
    def _sigma_stats(self, mix: dict) -> None:
        """The mixing coefficients σ ``(b, c)`` of the mixed samples (``mix["mixed"]``): their
        mean entropy and mean largest coefficient (accumulated on the device)."""
        sigma = mix["sigma"].detach().float()
        mixed = mix.get("mixed")
        mixed = torch.ones(sigma.shape[0], device=sigma.device) if mixed is None else mixed.float()
        entropy = -(sigma * sigma.clamp_min(1e-12).log()).sum(1)
        n = mixed.sum()
        self._accumulate("mixer/sigma_entropy", (entropy * mixed).sum(), n)
        self._accumulate("mixer/sigma_max", (sigma.amax(1) * mixed).sum(), n)
        self._accumulate("mixer/mixed_fraction", n, torch.full_like(n, len(mixed)))

    def pop_loss_means(self) -> dict[str, float]:
        """Mean of each loss over its finite values since the last call (NaN if none was
        finite; one host sync per call)."""
        if not self.loss_sums:
            return {}
        keys = list(self.loss_sums)
        sums = torch.stack([self.loss_sums[k] for k in keys])
        counts = torch.stack([self.loss_counts[k] for k in keys])
        means = torch.where(counts > 0, sums / counts.clamp(min=1e-12), float("nan")).tolist()
        self.loss_sums, self.loss_counts = {}, {}
        return dict(zip(keys, means, strict=True))

    def pop_nonfinite(self) -> dict[str, tuple[int, int]]:
        """Per optimizer side: ``(skipped steps, longest run in a row)`` since the last call."""
        return {side: guard.pop() for side, guard in self.guards.items()}

    def _total(self, losses: Sequence[Loss], step: Step, prefix: str) -> torch.Tensor:
        total = None
        for loss in losses:
            value = loss(step)
            self._accumulate(f"{prefix}/{loss.name}", value)
            total = value if total is None else total + value
        return total

    def _mark(self, marks: list[float] | None) -> None:
        if marks is not None:
            if self.acc.device.type == "cuda":
                torch.cuda.synchronize(self.acc.device)
            marks.append(time.perf_counter())

    def _student_for_generator(self, images: torch.Tensor, phase: Phase) -> torch.Tensor:
        """Student logits for a generator-side loss: differentiable in the images, no weight
        gradients (the unwrapped module, so DDP sees no extra forward). With
        ``observe_unmixed`` this forward does not observe the (mixed) batch."""
        student = self.acc.unwrap_model(self.student)
        hold = phase.observe and self.observe_unmixed
        if hold:
            set_quant_mode(student, "frozen")
        try:
            with no_grad_params(self.student_params):
                return student(images)
        finally:
            if hold:
                set_quant_mode(student, "observe")

    def iteration(self, phase: Phase, epoch: int, marks: list[float] | None = None) -> None:
        """One iteration; with ``marks`` (a list, benchmarking only) appends three timestamps:
        start, end of the generator step, end of the student step."""
        acc = self.acc
        train_gen = phase.generator and self.generator_trains
        self._mark(marks)
        if phase.observe and self.observe_unmixed:
            with torch.no_grad(), acc.autocast():
                unmixed = synthesize(
                    self.generator, self.mixer, self.batch_size, acc.device, mix=False
                )
                self.student(unmixed.images)
            del unmixed
        if train_gen:
            self.guards["generator"].begin()
        with acc.autocast():
            with torch.set_grad_enabled(train_gen):
                batch = synthesize(self.generator, self.mixer, self.batch_size, acc.device)
                if "sigma" in batch.mix:
                    self._sigma_stats(batch.mix)
                with self.teacher_taps:
                    teacher_logits = self.teacher(batch.images)
                teacher_taps = self.teacher_taps.collect()
                student_logits = None
                if train_gen and self.student_in_gen_step:
                    student_logits = self._student_for_generator(batch.images, phase)
                if train_gen:
                    step = Step(
                        batch,
                        teacher_logits,
                        student_logits,
                        teacher_taps=teacher_taps,
                        epoch=epoch,
                    )
                    gen_loss = self._total(self.gen_losses, step, "gen")
                    aux = self.mixer_module.aux_loss(step)
                    if aux is not None:
                        self._accumulate(f"gen/{type(self.mixer_module).__name__}", aux)
                        gen_loss = gen_loss + aux
        if train_gen:
            self.gen_opt.zero_grad(set_to_none=True)
            acc.backward(gen_loss)
            if acc.num_processes > 1:
                _all_reduce_grads(self.mixer_module)
            self.guards["generator"].step(gen_loss)
            gen = getattr(self.generator, "module", self.generator)
            if hasattr(gen, "after_step"):  # e.g. a pixel bank clips its pixels
                gen.after_step()
            del gen_loss, step  # the generator graph and its taps are freed here
        teacher_taps = {
            k: detach_taps(v) for k, v in teacher_taps.items() if k in self.student_reads
        }
        self._mark(marks)
        batch = batch.detached()
        self.last_batch = batch
        if phase.student:
            teacher_logits = teacher_logits.detach()
            scale = 1.0
            if self.constant_images is not None:
                batch, teacher_logits, teacher_taps = self.constant_images(
                    self, batch, teacher_logits, teacher_taps, epoch
                )
            if self.perturbation is not None:
                batch, teacher_logits, teacher_taps = self.perturbation(
                    self, batch, teacher_logits, teacher_taps, epoch
                )
                scale = self.perturbation.loss_scale
            self.guards["student"].begin()
            with acc.autocast(), self.student_taps:
                student_logits = self.student(batch.images)
                step = Step(
                    batch,
                    teacher_logits,
                    student_logits,
                    teacher_taps=teacher_taps,
                    student_taps=self.student_taps.collect(),
                    epoch=epoch,
                )
                student_loss = self._total(self.student_losses, step, "student")
                if scale != 1.0:
                    student_loss = scale * student_loss
            self.student_opt.zero_grad(set_to_none=True)
            acc.backward(student_loss)
            self.guards["student"].step(student_loss)
        elif (
            phase.observe
            and not self.observe_unmixed
            and (self.observe_twice or not (train_gen and self.student_in_gen_step))
        ):
            # (a generator step that ran the student has observed this batch already)
            with torch.no_grad(), acc.autocast():
                self.student(batch.images)
        self._mark(marks)


def _all_reduce_grads(module: nn.Module) -> None:
    """Average ``module``'s gradients over processes (one flat all-reduce), for parts that are
    not DDP-wrapped. Which parameters get a gradient depends only on the epoch (the same on
    every rank), so a parameter without one stays without one (Adam then skips it)."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n


def _min_over_processes(value: torch.Tensor) -> torch.Tensor:
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value
