"""Cross-component checks of a run, made once before any training step.

Each failure is one :class:`~dfqkit.errors.ConfigError` line naming the parts involved and the
fix; the builder (:mod:`dfqkit.build`) calls :func:`check_setup` before it creates optimizers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dfqkit.errors import ConfigError
from dfqkit.losses.base import Loss
from dfqkit.taps import bn_layers


def check_setup(
    *,
    teacher: nn.Module,
    data,
    generator: nn.Module,
    mixer: nn.Module,
    losses: Sequence[Loss],
    batch_size: int,
    device: torch.device,
    trains_student: bool = True,
) -> None:
    """Cross-component checks that must fail before any training step, with one clear line."""
    if not losses and (generator.trainable or trains_student):
        raise ConfigError("train.losses is empty: give at least one loss")
    for loss in losses:
        if not isinstance(loss, Loss):
            raise ConfigError(f"train.losses holds {loss!r}, which is not a dfqkit loss")
    bn_losses = [type(loss).__name__ for loss in losses if loss.requires_bn and loss.weight != 0]
    if bn_losses and not bn_layers(teacher):
        raise ConfigError(
            f"{', '.join(bn_losses)} matches batch-norm statistics, but the teacher "
            f"({type(teacher).__name__}) has no BatchNorm layer with running statistics "
            "(a ViT normalizes with LayerNorm): remove it from train.losses"
        )
    stages = getattr(generator, "accepts_stages", frozenset())
    if mixer.stage not in stages:
        raise ConfigError(
            f"mixer {type(mixer).__name__} acts at stage {mixer.stage!r} but generator "
            f"{type(generator).__name__} accepts only {sorted(stages)}"
        )
    sigma_losses = [type(x).__name__ for x in losses if getattr(x, "needs_learned_sigma", False)]
    if sigma_losses and not getattr(mixer, "learns_sigma", False):
        raise ConfigError(
            f"{', '.join(sigma_losses)} in train.losses reads the mixing coefficients σ that the "
            f"mixer learns, but train.mixer ({type(mixer).__name__}) learns none: use "
            "@mixers.MultiLayerAttentionMixer() with heads > 0, or remove the loss"
        )
    if generator.trainable and not any(loss.side == "generator" for loss in losses):
        raise ConfigError("the generator is trainable but train.losses has no generator-side loss")
    if trains_student and not any(loss.side == "student" for loss in losses):
        raise ConfigError("train.losses has no student-side loss: the student would never train")
    if generator.num_classes != data.num_classes:
        raise ConfigError(
            f"generator num_classes={generator.num_classes} but dataset {data.name!r} has "
            f"{data.num_classes} classes"
        )
    gen_size = getattr(generator, "image_size", data.image_size)
    gen_channels = getattr(generator, "channels", data.channels)
    if (gen_size, gen_channels) != (data.image_size, data.channels):
        raise ConfigError(
            f"generator makes {gen_channels}×{gen_size}×{gen_size} images but dataset "
            f"{data.name!r} has {data.channels}×{data.image_size}×{data.image_size}"
        )
    probe = torch.zeros(2, data.channels, data.image_size, data.image_size, device=device)
    try:
        with torch.no_grad():
            logits = teacher(probe)
    except (RuntimeError, ValueError, AssertionError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"the teacher cannot take {data.channels}×{data.image_size}×{data.image_size} "
            f"images: {first}"
        ) from err
    if logits.dim() != 2 or logits.shape[1] != data.num_classes:
        raise ConfigError(
            f"the teacher returns logits of shape {tuple(logits.shape)}; expected "
            f"(batch, {data.num_classes}) for dataset {data.name!r}"
        )


def launched_processes() -> int | None:
    """The ``--num_processes`` that ``accelerate launch`` (our parent process) was given, or
    ``None`` (read from the parent's command line; Linux only)."""
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in argv if a]
    if "launch" not in args or not any("accelerate" in a for a in args[:3]):
        return None
    for i, a in enumerate(args):
        if a == "--num_processes" and i + 1 < len(args) and args[i + 1].isdigit():
            return int(args[i + 1])
        if a.startswith("--num_processes="):
            return int(a.split("=", 1)[1]) if a.split("=", 1)[1].isdigit() else None
    return None


def check_launch() -> None:
    """``accelerate launch --num_processes N --cpu`` starts one process (Accelerate 1.x): say
    so at start-up instead of silently running on one."""
    asked = launched_processes()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if asked and asked > world:
        logging.getLogger(__name__).warning(
            f"accelerate launch was asked for {asked} processes but started {world}; on CPUs "
            f"Accelerate runs one process: use torchrun --nproc_per_node {asked} -m "
            "dfqkit.train ... for several (docs/training.md, 'Several processes')"
        )
