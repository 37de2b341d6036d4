"""Block-wise reconstruction (Genie-M): PTQ that learns rounding and step sizes unit by unit.

After the calibration pass has observed the activation ranges, the quantized student is
reconstructed one *unit* at a time, in execution order: a residual block (``BasicBlock``,
``Bottleneck``, ``InvertedResidual``, pytorchcv's ``ResUnit``, ...) or a conv/linear layer that
lies in no block. For each unit, on the calibration images:

1. one pass of the teacher and of the student (units before this one already reconstructed,
   hard rounding) records the unit's float input ``x``, quantized input ``x_q`` and float
   output ``y`` (the teacher's);
2. ``iterations`` steps of batches of ``batch_size`` minimise

       ||Q_unit(x_mix) - y||²  (summed over channels, mean over the rest)
         + round_weight · Σ_layers Σ (1 - |2 h(v) - 1|^β)

   where ``x_mix`` takes each element from ``x_q`` or ``x`` with probability ½ (QDrop), the
   unit's activation quantizers keep each element float with their ``drop_prob`` (QDrop), and
   the rounding term starts after ``warmup`` of the steps with β annealed linearly from
   ``beta[0]`` to ``beta[1]`` (AdaRound). Adam trains the weight step sizes (lr
   ``lr_weight_scale``), the activation step sizes (``lr_act_scale``), both with a cosine
   schedule over the steps, and the rounding logits (``lr_rounding``, constant);
3. the unit's weights switch to hard rounding and its activation ranges are written back.

Every random draw of a unit (batch order, QDrop masks) comes from a generator seeded with the
run's seed and the unit's index, so every process computes the same student and a resumed run
repeats a unit exactly. The trainer saves a checkpoint after each unit.

Reference: Genie (Jeon et al., CVPR 2023), ``reconstruct.py`` of the official code (defaults
here), after BRECQ (Li et al., ICLR 2021) and QDrop (Wei et al., ICLR 2022).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dfqkit.generators.base import synthesize
from dfqkit.quant.act_lsq import LSQActQuantizer
from dfqkit.quant.modules import QuantConv2d, QuantLinear
from dfqkit.quant.weight_adaround import AdaRoundWeightQuantizer
from dfqkit.registry import register

#: Block classes reconstructed as one unit (by class name, as Genie's ``reconstruct_unit``).
DEFAULT_UNITS: tuple[str, ...] = (
    "BasicBlock",  # torchvision / timm ResNet
    "Bottleneck",
    "ResBottleneckBlock",  # RegNet
    "InvertedResidual",  # MobileNetV2
    "_InvertedResidual",  # torchvision MnasNet
    "Conv2dNormActivation",  # torchvision conv + BN + activation outside a block (stems, heads)
    "DwsConvBlock",  # pytorchcv MobileNet
    "ResUnit",  # pytorchcv CIFAR ResNet (dfqkit's ResNet-20 and zoo ResNets)
    "ConvBlock",  # pytorchcv conv + BN + ReLU (the stem)
)


@dataclass(frozen=True)
class Unit:
    """One reconstruction unit: its module name and the teacher's and student's modules."""

    name: str
    teacher: nn.Module
    student: nn.Module


def _positive(name: str, value, *, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        what = "a positive integer" if integer else "a positive number"
        raise ValueError(f"BlockReconstruction.{name} must be {what}, got {value!r}")


@register("ptq")
class BlockReconstruction:
    """Genie-M's block-wise reconstruction with AdaRound, LSQ step sizes and QDrop.

    The student must be quantized with :class:`~dfqkit.quant.AdaRoundWeightQuantizer` weights
    (``quant.QuantConfig.weight_quantizer``); activation quantizers that are
    :class:`~dfqkit.quant.LSQActQuantizer` learn their step size, others keep their range.

    Args:
        iterations: steps per unit (Genie 20,000).
        batch_size: images per step (Genie 32).
        num_samples: calibration images (Genie 1,024): the first ``num_samples`` of a
            fixed synthetic set, or that many drawn from a generator.
        round_weight: weight of the rounding regulariser (Genie 1.0).
        beta: start and end of the annealed exponent β (20 → 2).
        warmup: fraction of the steps before the regulariser starts and β decays (0.2).
        lr_weight_scale: Adam learning rate of the weight step sizes (1e-4).
        lr_act_scale: Adam learning rate of the activation step sizes (4e-5).
        lr_rounding: Adam learning rate of the rounding logits (1e-3).
        input_drop_prob: probability that an element of the unit's input is the float one
            (QDrop; 0.5).
        units: class names reconstructed as one block; other conv/linear layers are units of
            their own.
    """

    def __init__(
        self,
        *,
        iterations: int = 20000,
        batch_size: int = 32,
        num_samples: int = 1024,
        round_weight: float = 1.0,
        beta: Sequence[float] = (20.0, 2.0),
        warmup: float = 0.2,
        lr_weight_scale: float = 1e-4,
        lr_act_scale: float = 4e-5,
        lr_rounding: float = 1e-3,
        input_drop_prob: float = 0.5,
        units: Sequence[str] = DEFAULT_UNITS,
    ) -> None:
        for name, value in (
            ("iterations", iterations),
            ("batch_size", batch_size),
            ("num_samples", num_samples),
        ):
            _positive(name, value, integer=True)
        for name, value in (
            ("lr_weight_scale", lr_weight_scale),
            ("lr_act_scale", lr_act_scale),
            ("lr_rounding", lr_rounding),
        ):
            _positive(name, value)
        if isinstance(round_weight, bool) or not isinstance(round_weight, int | float):
            raise ValueError(
                f"BlockReconstruction.round_weight must be a number, got {round_weight!r}"
            )
        if round_weight < 0:
            raise ValueError(f"BlockReconstruction.round_weight must be >= 0, got {round_weight}")
        if (
            not isinstance(beta, Sequence)
            or len(beta) != 2
            or not all(isinstance(b, int | float) and b > 0 for b in beta)
        ):
            raise ValueError(
                f"BlockReconstruction.beta must be two positive numbers (start, end), got {beta!r}"
            )
        for name, value in (("warmup", warmup), ("input_drop_prob", input_drop_prob)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
                raise ValueError(f"BlockReconstruction.{name} must be in [0, 1), got {value!r}")
        if isinstance(units, str) or not all(isinstance(u, str) for u in units):
            raise ValueError(
                f"BlockReconstruction.units must be a list of class names, got {units!r}"
            )
        if batch_size > num_samples:
            raise ValueError(
                f"BlockReconstruction.batch_size={batch_size} is larger than "
                f"num_samples={num_samples}"
            )
        self.iterations = iterations
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.round_weight = float(round_weight)
        self.beta = (float(beta[0]), float(beta[1]))
        self.warmup = float(warmup)
        self.lr_weight_scale = float(lr_weight_scale)
        self.lr_act_scale = float(lr_act_scale)
        self.lr_rounding = float(lr_rounding)
        self.input_drop_prob = float(input_drop_prob)
        self.unit_types = tuple(units)

    # ---- set-up

    def units(self, teacher: nn.Module, student: nn.Module, example: Tensor) -> list[Unit]:
        """The units of ``student``, in execution order (one dry forward of the teacher)."""
        students = dict(student.named_modules())
        quantized = {n for n, m in students.items() if isinstance(m, QuantConv2d | QuantLinear)}
        candidates: list[str] = []
        covered: set[str] = set()
        for name, module in teacher.named_modules():
            if not name or any(name.startswith(c + ".") for c in covered):
                continue
            if type(module).__name__ in self.unit_types or name in quantized:
                candidates.append(name)
                covered.add(name)
        modules = dict(teacher.named_modules())
        order: dict[str, int] = {}

        def seen(name: str):
            def hook(_module, _args) -> None:
                order.setdefault(name, len(order))

            return hook

        handles = [modules[n].register_forward_pre_hook(seen(n)) for n in candidates]
        try:
            with torch.no_grad():
                teacher(example)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in candidates if n not in students]
        if missing:
            raise ValueError(
                f"BlockReconstruction: the student has no module {missing[0]!r} of the teacher "
                "(the quantization policy renamed modules; use policy='layer_inputs')"
            )
        called = sorted((n for n in candidates if n in order), key=order.__getitem__)
        return [Unit(n, modules[n], students[n]) for n in called]

    def check(self, student: nn.Module) -> None:
        """Raise ``ValueError`` unless ``student``'s weights are AdaRound-quantized."""
        layers = [m for m in student.modules() if isinstance(m, QuantConv2d | QuantLinear)]
        other = sorted(
            {
                type(m.weight_quant).__name__
                for m in layers
                if not isinstance(m.weight_quant, AdaRoundWeightQuantizer)
            }
        )
        if not layers or other:
            raise ValueError(
                "train.reconstruction = BlockReconstruction learns the weights' rounding, so "
                "quant.QuantConfig.weight_quantizer must be @quantizers.AdaRoundWeightQuantizer"
                + (f" (got {', '.join(other)})" if other else "")
            )

    def calibration_images(
        self,
        generator: nn.Module,
        mixer: nn.Module,
        batch_size: int,
        device: torch.device,
        seed: int,
    ) -> Tensor:
        """``num_samples`` images: the first of a fixed synthetic set, else drawn after
        reseeding with ``seed`` (the same images on every process and after a resume)."""
        gen = getattr(generator, "module", generator)
        fixed = getattr(gen, "images", None)
        if isinstance(fixed, Tensor) and fixed.numel():
            if len(fixed) < self.num_samples:
                raise ValueError(
                    f"BlockReconstruction.num_samples={self.num_samples} but the synthetic set "
                    f"holds {len(fixed)} images"
                )
            return fixed[: self.num_samples].to(device)
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed_all(seed)
        parts, have = [], 0
        was_training = gen.training
        gen.eval()
        with torch.no_grad():
            while have < self.num_samples:
                images = synthesize(generator, mixer, batch_size, device).images.float()
                parts.append(images)
                have += len(images)
        gen.train(was_training)
        return torch.cat(parts)[: self.num_samples]

    # ---- one unit

    @torch.no_grad()
    def _record(self, teacher, student, unit: Unit, images: Tensor) -> tuple[Tensor, ...]:
        seen: dict[str, list[Tensor]] = {"x": [], "y": [], "x_q": []}

        def keep_teacher(_m, args, out):
            seen["x"].append(args[0].detach())
            seen["y"].append(out.detach())

        def keep_student(_m, args):
            seen["x_q"].append(args[0].detach())

        handles = [
            unit.teacher.register_forward_hook(keep_teacher),
            unit.student.register_forward_pre_hook(keep_student),
        ]
        try:
            for batch in images.split(self.batch_size):
                teacher(batch)
                student(batch)
        finally:
            for h in handles:
                h.remove()
        return tuple(torch.cat(seen[k]).float() for k in ("x", "x_q", "y"))

    def _beta(self, step: int) -> float:
        start = self.warmup * self.iterations
        if step < start:
            return self.beta[0]
        rel = (step - start) / max(self.iterations - start, 1)
        return self.beta[1] + (self.beta[0] - self.beta[1]) * max(0.0, 1.0 - rel)

    def reconstruct_unit(
        self, teacher: nn.Module, student: nn.Module, unit: Unit, images: Tensor, seed: int
    ) -> Tensor:
        """Reconstruct one unit in place; returns its mean reconstruction loss (0-dim tensor)."""
        x, x_q, y = self._record(teacher, student, unit, images)
        weights = [m for m in unit.student.modules() if isinstance(m, AdaRoundWeightQuantizer)]
        acts = [m for m in unit.student.modules() if isinstance(m, LSQActQuantizer)]
        rng = torch.Generator(device=x.device)
        rng.manual_seed(seed)
        groups = [{"params": [w.scale for w in weights], "lr": self.lr_weight_scale}]
        if acts:
            groups.append({"params": [a.scale for a in acts], "lr": self.lr_act_scale})
        opt_scale = torch.optim.Adam(groups)
        opt_round = torch.optim.Adam([w.logits for w in weights], lr=self.lr_rounding)
        base = [g["lr"] for g in opt_scale.param_groups]
        learned = {id(p) for g in groups for p in g["params"]} | {id(w.logits) for w in weights}
        fixed = [p for p in unit.student.parameters() if p.requires_grad and id(p) not in learned]
        for p in fixed:  # BN and conv parameters stay as they are: no gradients for them
            p.requires_grad_(False)
        for w in weights:
            w.soft = True
        for a in acts:
            a.learning, a.rng = True, rng
        total = torch.zeros((), device=x.device)
        n = len(x)
        order = torch.randperm(n, generator=rng, device=x.device)
        pos = 0
        try:
            for step in range(self.iterations):
                if pos + self.batch_size > n:
                    order, pos = torch.randperm(n, generator=rng, device=x.device), 0
                idx = order[pos : pos + self.batch_size]
                pos += self.batch_size
                xf, xq = x[idx], x_q[idx]
                keep_float = (
                    torch.rand(xf.shape, generator=rng, device=x.device) < self.input_drop_prob
                )
                out = unit.student(torch.where(keep_float, xf, xq))
                rec = (out.float() - y[idx]).pow(2).sum(1).mean()
                loss = rec
                if self.round_weight and step >= self.warmup * self.iterations:
                    beta = self._beta(step)
                    loss = loss + self.round_weight * sum(w.rounding_loss(beta) for w in weights)
                opt_scale.zero_grad(set_to_none=True)
                opt_round.zero_grad(set_to_none=True)
                loss.backward()
                opt_scale.step()
                opt_round.step()
                factor = 0.5 * (1.0 + math.cos(math.pi * (step + 1) / self.iterations))
                for group, lr in zip(opt_scale.param_groups, base, strict=True):
                    group["lr"] = lr * factor
                total += rec.detach()
        finally:
            for p in fixed:
                p.requires_grad_(True)
            for w in weights:
                w.soft = False
            for a in acts:
                a.learning, a.rng = False, None
                a.refresh_range_()
        return total / self.iterations

    def __repr__(self) -> str:
        return (
            f"BlockReconstruction(iterations={self.iterations}, batch_size={self.batch_size}, "
            f"num_samples={self.num_samples}, round_weight={self.round_weight})"
        )
