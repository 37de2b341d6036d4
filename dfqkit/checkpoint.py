"""Crash-safe checkpoints on top of ``Accelerator.save_state``.

A checkpoint is written into ``checkpoints/.tmp-epoch-NNNN``, marked complete with a
``COMPLETE`` file once every process has written its part, and only then renamed to
``checkpoints/epoch-NNNN`` (an atomic rename). A run killed mid-write leaves a ``.tmp-*``
directory that is never loaded and is removed by the next save. The newest ``keep`` epoch
checkpoints are kept.

Whenever validation improves, that epoch's checkpoint is also kept as ``checkpoints/best``, by
the same protocol: copied into ``.tmp-best``, marked ``COMPLETE``, then swapped in (the previous
``best`` is renamed to ``.old-best`` first and removed last, so a kill at any point leaves a
complete ``best`` or ``.old-best`` that :func:`best_checkpoint` finds).

Before a checkpoint is loaded, :func:`verify_checkpoint` reads every file of it safely:
safetensors files through their header, every other file with ``torch.load(weights_only=True)``
(Accelerate itself loads ``custom_checkpoint_*.pkl`` with ``weights_only=False``, which would run
code hidden in a pickle). A corrupt, truncated or code-carrying file is refused, naming it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from dfqkit.errors import ConfigError
from dfqkit.models.weights import safe_torch_load

COMPLETE = "COMPLETE"
BEST = "best"
_NAME = re.compile(r"^epoch-(\d{4,})(?:-unit-(\d{4,}))?$")


def _order(path: Path) -> tuple[int, int]:
    """``epoch-NNNN`` sorts before ``epoch-NNNN-unit-MMMM`` (units reconstructed after it)."""
    match = _NAME.match(path.name)
    return int(match.group(1)), int(match.group(2) or 0)


class TrainState:
    """Loop state saved with every checkpoint (plain Python values only)."""

    def __init__(self) -> None:
        self.epochs_done = 0
        self.iterations = 0
        self.train_seconds = 0.0  # the epochs' iterations only
        self.post_seconds = 0.0  # the post-training stage (reconstruction), if any
        self.history: list[dict[str, Any]] = []
        self.reference: dict[str, Any] = {}  # teacher / naive accuracies, computed once
        self.best: dict[str, Any] | None = None  # the selected evaluation (headline fields)
        self.calibrated: dict[str, Any] | None = None  # the student before its first step
        self.evals_since_best = 0
        self.skipped_steps: dict[str, int] = {}  # non-finite steps skipped, per optimizer side
        self.units_done = 0  # units of a post-training reconstruction finished (dfqkit.ptq)
        #: wall seconds per phase: synthesis, references, calibration, training, evaluation,
        #: reconstruction (what a run spent where; metrics.json ``phase_seconds``)
        self.phase_seconds: dict[str, float] = {}

    def add_seconds(self, phase: str, seconds: float) -> None:
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + seconds

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def verify_checkpoint(path: Path) -> None:
    """Read every file of checkpoint ``path`` without executing anything; raise
    :class:`~dfqkit.errors.ConfigError` naming the first file that is corrupt, truncated, or holds
    pickled objects other than tensors and plain values."""
    from safetensors import SafetensorError, safe_open

    hint = f"remove {str(path)!r} to resume from the checkpoint before it"
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file() and p.name != COMPLETE):
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt", device="cpu") as st:
                    for key in st.keys():
                        st.get_slice(key)
            except (SafetensorError, OSError, ValueError, RuntimeError) as err:
                raise ConfigError(
                    f"checkpoint file {str(f)!r} is corrupt or truncated ({err}); {hint}"
                ) from err
            continue
        try:
            safe_torch_load(f, what="checkpoint file", hint=f"; {hint}")
        except ValueError as err:
            raise ConfigError(str(err)) from err


def checkpoint_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint, or ``None``."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if _NAME.match(p.name) and (p / COMPLETE).is_file()]
    return max(done, key=_order, default=None)


def save_checkpoint(
    accelerator, output_dir: Path, epoch: int, *, keep: int = 2, unit: int | None = None
) -> Path:
    """Save the full training state after ``epoch`` (1-based count of finished epochs) and,
    with ``unit``, after that many units of a post-training reconstruction."""
    root = checkpoint_dir(output_dir)
    name = f"epoch-{epoch:04d}" + ("" if unit is None else f"-unit-{unit:04d}")
    final = root / name
    tmp = root / f".tmp-{name}"
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
        done = sorted((p for p in root.iterdir() if _NAME.match(p.name)), key=_order)
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def best_checkpoint(output_dir: Path) -> Path | None:
    """The complete ``best`` checkpoint (the epoch with the best validation top-1), or
    ``None``; a ``best`` swap interrupted by a kill leaves ``.old-best``, found here too."""
    root = checkpoint_dir(output_dir)
    for name in (BEST, f".old-{BEST}"):
        if _complete(root / name):
            return root / name
    return None


def checkpoint_epoch(path: Path) -> int:
    """The number of epochs done when checkpoint ``path`` was written."""
    return int((path / COMPLETE).read_text().split()[0])


def save_best(accelerator, output_dir: Path, source: Path) -> Path:
    """Keep the complete checkpoint ``source`` (just written) as ``checkpoints/best``."""
    root = checkpoint_dir(output_dir)
    final, tmp, old = root / BEST, root / f".tmp-{BEST}", root / f".old-{BEST}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)  # a partial copy is never loaded: only `best` and
        # `.old-best` are, and each is complete (renamed only after the copy finished)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, config: Path) -> None:
    """Verify checkpoint ``path`` (:func:`verify_checkpoint`) and restore it into every part
    registered with ``accelerator``; a checkpoint of another configuration is refused naming
    the first mismatch and the run's ``config``."""
    verify_checkpoint(path)  # readable, and nothing in it would run code
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, KeyError, ValueError, IndexError) as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()][:2]
        detail = " ".join(lines)[:300] or type(err).__name__
        raise ConfigError(
            f"checkpoint {str(path)!r} does not fit this run ({detail}): it was written by "
            f"another configuration; compare {str(config)!r} with the recipe and bindings "
            "given now"
        ) from err
