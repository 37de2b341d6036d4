"""Crash-safe checkpoints on top of ``Accelerator.save_state``.

A checkpoint is written into ``checkpoints/.tmp-epoch-NNNN``, marked complete with a
``COMPLETE`` file once every process has written its part, and only then renamed to
``checkpoints/epoch-NNNN`` (an atomic rename). A run killed mid-write leaves a ``.tmp-*``
directory that is never loaded and is removed by the next save.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

COMPLETE = "COMPLETE"
_NAME = re.compile(r"^epoch-(\d{4,})$")


class TrainState:
    """Loop state saved with every checkpoint (plain Python values only)."""

    def __init__(self) -> None:
        self.epochs_done = 0
        self.iterations = 0
        self.train_seconds = 0.0
        self.history: list[dict[str, Any]] = []
        self.reference: dict[str, Any] = {}  # teacher / naive accuracies, computed once
        self.best: dict[str, Any] | None = None
        self.evals_since_best = 0

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def checkpoint_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint, or ``None``."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if _NAME.match(p.name) and (p / COMPLETE).is_file()]
    return max(done, key=lambda p: int(_NAME.match(p.name).group(1)), default=None)


def save_checkpoint(accelerator, output_dir: Path, epoch: int, *, keep: int = 2) -> Path:
    """Save the full training state after ``epoch`` (1-based count of finished epochs)."""
    root = checkpoint_dir(output_dir)
    final = root / f"epoch-{epoch:04d}"
    tmp = root / f".tmp-epoch-{epoch:04d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / COMPLETE).write_text(f"{epoch}\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        done = sorted(p for p in root.iterdir() if _NAME.match(p.name))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
