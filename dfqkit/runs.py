"""Run-directory helpers of the trainer: start-up checks, sample grids, the metrics summary."""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfqkit.config import ConfigError
from dfqkit.losses.base import Loss
from dfqkit.step import SynthBatch


def prepare_output_dir(output_dir: str | Path | None, *, resume: bool) -> Path:
    """Create (or, with ``resume``, reuse) the run directory; refuse to overwrite a run."""
    if output_dir is None:
        raise ConfigError("output_dir is required")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {str(out)!r} exists and is not a directory")
    if not resume and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise ConfigError(
            f"output_dir {str(out)!r} already holds a run: pass --resume to continue it, "
            "or choose another --output_dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def noise_batch(data, batch_size: int, device: torch.device) -> torch.Tensor:
    """Gaussian noise in the teacher's normalized input space, ``(b, c, s, s)``."""
    return torch.randn(batch_size, data.channels, data.image_size, data.image_size, device=device)


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
    from dfqkit.taps import bn_layers

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


def save_samples(batch: SynthBatch | None, data, path: Path, *, max_images: int = 64) -> None:
    """A grid of synthesized images, mapped back to pixel space with the data's mean/std."""
    if batch is None or batch.images is None:
        return
    from torchvision.utils import save_image

    images = batch.images[:max_images].detach().float().cpu()
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image((images * std + mean).clamp(0, 1), path, nrow=8)


_IMAGE_WARNED: set[str] = set()


def log_media(acc, teacher: nn.Module, batch: SynthBatch | None, data, step: int) -> None:
    """Log the sample grid to every tracker that takes images, and the teacher's activation
    histograms on that batch to trackers with a TensorBoard-style ``writer``."""
    if batch is None or batch.images is None:
        return
    from torchvision.utils import make_grid

    from dfqkit.taps import Taps

    images = batch.images[:64].detach().float().cpu()
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    grid = make_grid((images * std + mean).clamp(0, 1), nrow=8)
    taps = None
    for tracker in acc.trackers:
        if hasattr(tracker, "log_images"):  # not every Accelerate tracker takes images
            try:
                tracker.log_images({"samples": grid[None]}, step=step)
            except (TypeError, ValueError) as err:  # a tracker wanting another image format
                if tracker.name not in _IMAGE_WARNED:
                    _IMAGE_WARNED.add(tracker.name)
                    logging.getLogger(__name__).warning(
                        f"tracker {tracker.name!r} refused the sample grid "
                        f"({type(err).__name__}: {err}); the grid is still in samples/"
                    )
        writer = getattr(tracker, "writer", None)
        if writer is not None and hasattr(writer, "add_histogram"):
            if taps is None:
                taps = Taps(teacher, {"activations"})
                with torch.no_grad(), taps:
                    teacher(batch.images)
                acts = taps.collect()["activations"]
                taps.remove()
            for i, a in enumerate(acts):
                writer.add_histogram(f"teacher_activations/{i:02d}", a.float().cpu(), step)


def summarize(state, *, recipe: str, seed: int, quant, resumed_from: int | None) -> dict[str, Any]:
    """The ``metrics.json`` content (DESIGN.md names these fields; scripts rely on them)."""
    history = state.history
    last = history[-1] if history else {}
    last5 = [h["test_top1"] for h in history[-5:]]
    nan = math.nan
    return {
        "recipe": recipe,
        "seed": seed,
        "w_bits": quant.w_bits,
        "a_bits": quant.a_bits,
        "teacher": {"test_top1": state.reference["teacher"]["top1"]},
        "naive": {
            "test_top1": state.reference["naive"]["top1"],
            "test_agree": state.reference["naive"].get("agree", nan),
        },
        "best": {
            "epoch": state.best["epoch"] if state.best else None,
            "val_top1": state.best["val_top1"] if state.best else nan,
            "test_top1": state.best["test_top1"] if state.best else nan,
        },
        "last": {"epoch": last.get("epoch"), "test_top1": last.get("test_top1", nan)},
        "last5": {"test_top1": statistics.fmean(last5) if last5 else nan},
        "resumed_from_epoch": resumed_from,
        "epochs_done": state.epochs_done,
        "iterations": state.iterations,
        "skipped_steps": dict(getattr(state, "skipped_steps", {})),
        "ms_per_iter": 1000 * state.train_seconds / max(state.iterations, 1),
        "time_s": state.train_seconds,
        "history": history,
    }
