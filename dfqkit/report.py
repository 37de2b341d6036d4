"""What a run reports: the metrics summary (``metrics.json``), sample grids and tracker media."""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.utils import make_grid, save_image

from dfqkit.step import SynthBatch
from dfqkit.taps import Taps


def save_samples(batch: SynthBatch | None, data, path: Path, *, max_images: int = 64) -> None:
    """A grid of synthesized images, mapped back to pixel space with the data's mean/std."""
    if batch is None or batch.images is None:
        return
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
    """The ``metrics.json`` content (docs/training.md names these fields; scripts rely on them).

    ``best`` is the selected evaluation (the best validation top-1 among the epochs that
    trained the student; a run that never trains it reports its latest evaluation);
    ``calibrated`` is the student after calibration, before any student step (``None`` when
    the run trains the student from the start or was never evaluated then)."""
    evaluated = [h for h in state.history if "test_top1" in h]
    last = evaluated[-1] if evaluated else {}
    last5 = [h["test_top1"] for h in evaluated[-5:]]
    nan = math.nan

    def headline(record: dict[str, Any] | None) -> dict[str, Any] | None:
        if record is None:
            return None
        return {
            "epoch": record["epoch"],
            "val_top1": record["val_top1"],
            "test_top1": record["test_top1"],
        }

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
        "calibrated": headline(getattr(state, "calibrated", None)),
        "best": headline(state.best) or {"epoch": None, "val_top1": nan, "test_top1": nan},
        "last": {"epoch": last.get("epoch"), "test_top1": last.get("test_top1", nan)},
        "last5": {"test_top1": statistics.fmean(last5) if last5 else nan},
        "resumed_from_epoch": resumed_from,
        "epochs_done": state.epochs_done,
        "iterations": state.iterations,
        "skipped_steps": dict(getattr(state, "skipped_steps", {})),
        "ms_per_iter": 1000 * state.train_seconds / max(state.iterations, 1),
        "time_s": state.train_seconds,
        "history": state.history,
    }
