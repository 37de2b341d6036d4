"""What a run reports: the metrics summary (``metrics.json``), sample grids and tracker media."""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torchvision.utils import make_grid, save_image

from dfqkit.errors import RunInterrupted
from dfqkit.quant import clip_bounds
from dfqkit.step import SynthBatch
from dfqkit.taps import Taps

if TYPE_CHECKING:
    from dfqkit.run import Run


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
        "time_s": state.train_seconds + getattr(state, "post_seconds", 0.0),
        "post_training_s": getattr(state, "post_seconds", 0.0),
        "phase_seconds": dict(getattr(state, "phase_seconds", {})),
        "history": state.history,
    }


def epoch_record(run: Run, losses: dict[str, float]) -> dict[str, Any]:
    """The epoch's history entry before evaluation: its phase, the mean of every loss, the
    mixer's statistics and the learned clip bounds."""
    done = run.state.epochs_done
    trained = run.schedule.trains_student and done > run.schedule.warmup_epochs
    record: dict[str, Any] = {"epoch": done, "phase": "training" if trained else "calibration"}
    record["losses"] = {k: v for k, v in losses.items() if not k.startswith("mixer/")}
    mixer = {k.removeprefix("mixer/"): v for k, v in losses.items() if k.startswith("mixer/")}
    if mixer:
        record["mixer"] = mixer
    clips = clip_bounds(run.student_module)
    if clips:
        record["clips"] = clips
    return record


def record_scalars(record: dict[str, Any]) -> dict[str, float]:
    out = {f"mixer/{k}": v for k, v in record.get("mixer", {}).items()}
    for i, (lo, hi) in enumerate(zip(*record.get("clips", {}).values(), strict=False)):
        out[f"clip/{i:02d}/lo"], out[f"clip/{i:02d}/hi"] = lo, hi
    if "val_top1" in record:
        out.update({"eval/val_top1": record["val_top1"], "eval/test_top1": record["test_top1"]})
    return out


def headline(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("epoch", "phase", "val_top1", "test_top1", "test_top5", "test_agree", "stage")
    return {k: record[k] for k in keys if k in record}


def process_report(run: Run) -> dict[str, Any]:
    """Once, at the end: do all processes hold the same student (weights and quantizer
    ranges), and did they sample different latents? (Gathered from every rank.)"""
    acc = run.accelerator
    state = run.student_module.state_dict()
    values = [v.detach().double() for v in state.values() if v.is_floating_point()]
    signature = torch.stack([sum(v.sum() for v in values), sum(v.abs().sum() for v in values)])
    batch = run.engine.last_batch
    z = batch.z if batch is not None and batch.z is not None else None
    latent = z.double().sum() if z is not None else torch.zeros((), dtype=torch.float64)
    row = torch.cat([signature, latent[None]]).to(acc.device)[None]
    rows = acc.gather(row).cpu()  # (processes, 3)
    return {
        "count": acc.num_processes,
        "identical_student": bool((rows[:, :2] == rows[0, :2]).all()),
        "latent_sums": rows[:, 2].tolist(),
    }


def interrupted_message(err: KeyboardInterrupt, output_dir: str | None) -> str:
    """One line for Ctrl-C: what is kept and the command that resumes."""
    if not isinstance(err, RunInterrupted):
        return "interrupted before training started" + (
            f"; start again, or resume with: python -m dfqkit.train --resume --output_dir "
            f"{output_dir}"
            if output_dir
            else ""
        )
    last = err.last_checkpoint
    kept = f"the last complete checkpoint is {last.name}" if last else "no epoch was complete"
    return (
        f"interrupted; {kept}; resume with: python -m dfqkit.train --resume --output_dir "
        f"{err.output_dir}"
    )


def summary_line(m: dict[str, Any]) -> str:
    """The one line a finished run prints (the command line and ``dfqkit.quantize``)."""
    teacher_labels = m.get("evaluation", {}).get("labels") == "teacher"
    what = "agreement with the float teacher" if teacher_labels else "test top-1"
    teacher = "" if teacher_labels else f"teacher {m['teacher']['test_top1']:.2f} | "
    return (
        f"{what}: {teacher}naive {m['naive']['test_top1']:.2f} | quantized best-val epoch "
        f"{m['best']['epoch']}: {m['best']['test_top1']:.2f}, last {m['last']['test_top1']:.2f} "
        f"| run directory: {m['output_dir']}"
    )


def epoch_line(record: dict[str, Any], best: dict[str, Any] | None) -> str:
    """The log line of one epoch: its phase, its evaluation against the best so far, its loss
    means and the mixer's statistics."""
    head = f"epoch {record['epoch']} [{record['phase']}"
    head += ": no student step yet]" if record["phase"] == "calibration" else "]"
    parts = [head]
    if "val_top1" in record:
        where = f"best val {best['val_top1']:.2f} @ {best['epoch']}" if best else "no best yet"
        parts.append(f"val {record['val_top1']:.2f} test {record['test_top1']:.2f} ({where})")
    if record.get("losses"):
        parts.append(" ".join(f"{k} {v:.4g}" for k, v in record["losses"].items()))
    if "mixer" in record:
        parts.append(" ".join(f"{k} {v:.3g}" for k, v in record["mixer"].items()))
    return " | ".join(parts)


def save_media(run: Run) -> None:
    """The grid of the last synthesized batch in ``samples/``, and to the trackers."""
    if not run.accelerator.is_main_process:
        return
    batch, done = run.engine.last_batch, run.state.epochs_done
    save_samples(batch, run.data, run.output_dir / "samples" / f"epoch_{done:04d}.png")
    if run.trackers:
        log_media(run.accelerator, run.teacher, batch, run.data, done)
