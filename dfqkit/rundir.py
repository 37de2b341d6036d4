"""The run directory: where a run's configuration is written, resumed from, and rebuilt from.

A run directory is self-contained: ``config.gin`` holds the whole configuration (the recipe with
its includes inlined, the command-line bindings, ``train.recipe``; :func:`dfqkit.config.flatten`),
``checkpoints/`` the loop state, and whatever else a rebuild needs (the teacher's weights of a
``dfqkit.quantize`` run). ``--resume``, ``export --run`` and ``diagnose`` read nothing else.

On ``--resume`` the run continues from its own ``config.gin``. A recipe or bindings given with
it may change only the settings in :data:`RESUMABLE`; anything else is refused, naming each
difference. Accepted changes are appended to ``config.gin`` (so it stays the truth).

One process at a time: the main process of a training run holds an exclusive lock on
``run.lock`` in the directory from the moment it opens it until the run ends (an OS file lock,
released by the kernel when the process dies, even by ``kill -9``, so a killed run never leaves a
stale lock). A second ``dfqkit.train`` (or ``--resume``, or ``dfqkit.quantize``) on a directory
whose run is still alive is refused before it writes anything, naming the process that holds it:
two processes writing one directory would interleave their checkpoints and ``metrics.json``.
Reading a run (``export --run``, ``diagnose``, :func:`load_run`) takes no lock.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gin
import torch

from dfqkit import bindings
from dfqkit import checkpoint as ckpt
from dfqkit import config as cfg
from dfqkit.build import build_run
from dfqkit.errors import ConfigError
from dfqkit.quant import set_quant_mode
from dfqkit.run import WHICH, Run

logger = logging.getLogger(__name__)

CONFIG = "config.gin"
METRICS = "metrics.json"
LOCK = "run.lock"
#: Settings that may change on ``--resume`` (anything else is a different run):
RESUMABLE = {
    "EPOCHS": "extend or shorten the run",
    "train.epochs": "extend or shorten the run",
    "train.early_stopping_patience": "stop earlier or later",
    "train.eval_every": "evaluate more or less often",
    "train.max_nonfinite_in_a_row": "tolerate more or fewer skipped steps",
    "train.checkpoint_keep": "keep more or fewer checkpoints",
    "train.trackers": "log elsewhere",
    "DATA_ROOT": "the evaluation images moved",
}
#: ... and any learning rate: a binding ``*.lr`` or a macro ``*_LR`` (e.g. after a divergence).
RESUMABLE_PATTERN = re.compile(r"(^|[./])lr$|^[A-Z0-9_]*_LR$")
IGNORED = ("train.recipe",)  # informational


@dataclass(frozen=True)
class OpenedRun:
    """A run directory whose configuration is parsed, finalized and saved."""

    output_dir: Path
    recipe: str
    resume: bool
    note: str | None = None  # said first, before anything is built
    #: the bindings the user set on the command line (checked to be read once the run is built)
    user_keys: tuple[tuple[str, str, str], ...] = ()


@gin.configurable("run_file", module="dfqkit")
def run_file(name: str = gin.REQUIRED, run_dir: str = gin.REQUIRED) -> str:
    """The path of file ``name`` inside the run directory (gin: ``@run_file()`` with
    ``run_file.run_dir = %RUN_DIR``; ``RUN_DIR`` is bound to the run directory being opened,
    so a run that moved still finds its own files)."""
    return str(Path(run_dir) / name)


def _bind_run_dir(out: Path) -> None:
    gin.parse_config(f"RUN_DIR = {str(out.resolve())!r}")


def _main_rank() -> bool:
    """Whether this is the main process of its launch (before Accelerate exists)."""
    return int(os.environ.get("RANK", "0")) == 0


try:  # POSIX
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True

except ImportError:  # Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True


#: run directories whose lock this process holds: resolved path -> open file descriptor
_HELD: dict[Path, int] = {}


def _forget_in_child() -> None:
    # A forked child (a DataLoader worker) shares the parent's lock; closing its copy keeps it
    # from holding the directory after the parent dies (the parent's copy still holds it).
    for fd in _HELD.values():
        os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def lock_run_dir(out: Path) -> None:
    """Take the run directory's lock for this process (main rank only; a no-op if this process
    holds it already). Refuses with :class:`ConfigError` naming the holder when another live
    process holds it."""
    key = out.resolve()
    if key in _HELD or not _main_rank():
        return
    fd = os.open(key / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    if not _try_lock(fd):
        try:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "holder unknown"
        except OSError:  # Windows' locks are mandatory: the holder's bytes cannot be read
            holder = "holder unknown"
        finally:
            os.close(fd)
        raise ConfigError(
            f"output_dir {str(out)!r} is in use by another dfqkit run ({holder}): wait for it to "
            f"end or stop it (Ctrl-C keeps its last checkpoint), then --resume; two processes "
            f"writing one run directory would interleave their checkpoints"
        )
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {stamp}\n".encode())
    _HELD[key] = fd


def unlock_run_dir(out: str | Path) -> None:
    """Release the run directory's lock if this process holds it (the run ended or failed)."""
    fd = _HELD.pop(Path(out).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the lock; the file stays (harmless)


def prepare_output_dir(output_dir: str | Path | None, *, resume: bool) -> Path:
    """Create (or, with ``resume``, reuse) the run directory and take its lock; refuse to
    overwrite a run, or to open one that another live process is running."""
    if output_dir is None:
        raise ConfigError("output_dir is required")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {str(out)!r} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    lock_run_dir(out)
    if not resume and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        unlock_run_dir(out)
        raise ConfigError(
            f"output_dir {str(out)!r} already holds a run: pass --resume to continue it, "
            "or choose another --output_dir"
        )
    return out


def _seed() -> int:
    seed = cfg.macro_value("SEED", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"SEED must be an integer >= 0, got {seed!r}")
    return seed


def open_run(
    gin_files: Sequence[str | Path],
    gin_params: Sequence[str] = (),
    *,
    output_dir: str | Path | None = None,
    resume: bool = False,
    recipe: str | None = None,
    trusted: Sequence[str] = (),
) -> OpenedRun:
    """Parse the configuration of a new run (``gin_files`` + ``gin_params``) or of a resumed one
    (its own ``config.gin``, plus the allowed changes), write ``config.gin`` and finalize gin.

    A macro set in ``gin_params`` or at the top of a given file that nothing reads is refused
    (:func:`dfqkit.bindings.unread_macros`).

    Args:
        gin_files, gin_params: the recipe and bindings (for a resumed run: optional).
        output_dir: the run directory (new runs: default ``runs/<recipe>/seed<SEED>``).
        resume: continue the run in ``output_dir``.
        recipe: the name recorded as ``train.recipe`` (default: the first file's name).
        trusted: bindings applied before ``gin_params`` and not checked for being read
            (what ``dfqkit.quantize`` itself binds).
    """
    if resume:
        if output_dir is None:
            raise ConfigError("--resume needs --output_dir RUN: the run directory to continue")
        if (Path(output_dir) / CONFIG).is_file():
            return _reopen(Path(output_dir), gin_files, gin_params)
        if not gin_files:
            raise ConfigError(
                f"--resume: {str(output_dir)!r} is not a dfqkit run directory (no {CONFIG}); "
                "pass --gin RECIPE to start a new run there"
            )
    files = cfg.parse(gin_files, trusted, finalize=False, allow_required=True)
    before = bindings.values()
    files = cfg.parse(gin_files, [*trusted, *gin_params], finalize=False)
    user_keys = tuple(k for k, v in bindings.values().items() if before.get(k) != v)
    _refuse(bindings.unread_macros(bindings.macros_set(files, gin_params)))
    name = recipe if recipe is not None else cfg.recipe_name(files[0])
    if output_dir is None:
        output_dir = Path("runs") / cfg.run_name(files[0]) / f"seed{_seed()}"
    _seed()
    out = prepare_output_dir(output_dir, resume=resume)
    try:
        params = [*trusted, *gin_params, f"train.recipe = {name!r}"]
        with gin.unlock_config():
            gin.bind_parameter("dfqkit.train.recipe", name)
        (out / CONFIG).write_text(cfg.flatten(files, params))
        _bind_run_dir(out)
        gin.finalize()
    except BaseException:
        unlock_run_dir(out)
        raise
    note = None
    if resume:
        note = f"--resume: {str(out)!r} held no run ({CONFIG} missing): starting a new run there"
    return OpenedRun(out, name, resume=False, note=note, user_keys=user_keys)


def _refuse(errors: list[str]) -> None:
    if errors:
        raise ConfigError("; ".join(errors))


def check_read(opened: OpenedRun) -> None:
    """Once the run is built: refuse command-line bindings of parts the run does not have."""
    _refuse(bindings.unread_bindings(opened.user_keys))


def _reopen(out: Path, gin_files: Sequence[str | Path], gin_params: Sequence[str]) -> OpenedRun:
    lock_run_dir(out)  # before anything is read or appended
    try:
        return _reopen_locked(out, gin_files, gin_params)
    except BaseException:
        unlock_run_dir(out)
        raise


def _reopen_locked(
    out: Path, gin_files: Sequence[str | Path], gin_params: Sequence[str]
) -> OpenedRun:
    config = out / CONFIG
    cfg.parse([config], finalize=False)
    stored = cfg.binding_names(cfg.snapshot())
    if gin_files or gin_params:
        cfg.parse(list(gin_files) or [config], gin_params, finalize=False)
        given = cfg.binding_names(cfg.snapshot())
        changed = {
            k: (stored.get(k, "(unset)"), given.get(k, "(unset)"))
            for k in sorted(set(stored) | set(given))
            if stored.get(k) != given.get(k) and k not in IGNORED
        }
        refused = {k: v for k, v in changed.items() if not resumable(k)}
        if refused:
            diffs = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in refused.items())
            raise ConfigError(
                f"--resume {str(out)!r}: the configuration given differs from the run's own "
                f"{CONFIG} ({diffs}); only {', '.join(RESUMABLE)} and learning rates may "
                "change on resume: drop --gin/--gin_param to continue as it was, or start a "
                "new run with another --output_dir"
            )
        _refuse(bindings.unread_macros(bindings.macros_set([], gin_params)))
        if changed:
            stamp = datetime.datetime.now().isoformat(timespec="seconds")
            lines = [f"{k} = {given[k]}" for k in changed if k in given]
            with config.open("a") as f:
                f.write(f"# ---- changed on --resume, {stamp}\n" + "\n".join(lines) + "\n")
            logger.info("--resume with changed settings: %s", "; ".join(lines))
    cfg.parse([config], finalize=False)
    _seed()
    name = _query("train.recipe") or CONFIG
    _bind_run_dir(out)
    gin.finalize()
    note = None
    if ckpt.latest_checkpoint(out) is None:
        note = (
            f"--resume: {str(out)!r} has no complete checkpoint: starting it from epoch 0 "
            f"with its own {CONFIG}"
        )
    return OpenedRun(out, name, resume=True, note=note)


def _query(binding: str):
    try:
        return gin.query_parameter(binding)
    except ValueError:
        return None


def resumable(binding: str) -> bool:
    """Whether ``binding`` (a name as :func:`dfqkit.config.binding_names` writes it) may
    change on ``--resume``."""
    return binding in RESUMABLE or bool(RESUMABLE_PATTERN.search(binding))


def build(opened: OpenedRun, *, for_training: bool = True) -> Run:
    """Build the :class:`Run` of a directory whose configuration is parsed."""
    torch.manual_seed(_seed())  # components built by gin references are initialised identically
    return build_run(output_dir=opened.output_dir, for_training=for_training)


def load_run(run_dir: str | Path, *, which: str | None = None, need_checkpoint: bool = True) -> Run:
    """Rebuild a finished (or interrupted) run from its directory, without training.

    Parses ``run_dir/config.gin``, builds every part and loads checkpoint ``which``:
    ``"best"`` (the epoch with the best validation top-1), ``"last"`` (the newest), or
    ``None``: the best when there is one, else the last, with a warning (a run written before
    best checkpoints were kept). The student's activation ranges are frozen, eval mode.

    Raises:
        ConfigError: not a run directory, no such checkpoint (``need_checkpoint``), or a
            checkpoint that does not fit the configuration.
    """
    run_dir = Path(run_dir)
    if which is not None and which not in WHICH:
        raise ConfigError(f"which must be one of {WHICH}, got {which!r}")
    if not (run_dir / CONFIG).is_file():
        raise ConfigError(f"--run {str(run_dir)!r} has no {CONFIG}: not a dfqkit run")
    cfg.parse([run_dir / CONFIG], finalize=False)
    _bind_run_dir(run_dir)
    gin.finalize()
    recipe = _query("train.recipe") or CONFIG
    run = build(OpenedRun(run_dir, recipe, resume=True), for_training=False)
    chosen = which or ("best" if run.checkpoint_path("best") is not None else "last")
    path = run.load(chosen)
    if path is None and need_checkpoint:
        raise ConfigError(f"--run {str(run_dir)!r} has no complete {chosen!r} checkpoint")
    if path is not None and which is None and chosen == "last":
        logger.warning(
            "%s has no 'best' checkpoint (written before dfqkit kept one): using the last, "
            "epoch %d, which need not be the best-validation epoch of metrics.json",
            run_dir,
            ckpt.checkpoint_epoch(path),
        )
    set_quant_mode(run.student_module.eval(), "frozen")
    return run


def _model_key(run_dir: Path, path: str | Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(run_dir).resolve()))
    except ValueError:
        return str(path)


def record_model(run_dir: str | Path, path: str | Path, loaded: tuple[str, int] | None) -> None:
    """Record in ``run_dir/metrics.json`` (``models``) which checkpoint (``best``/``last``)
    and epoch the model written to ``path`` (an export, or the student ``dfqkit.quantize``
    returned) comes from."""
    which, epoch = loaded if loaded is not None else ("none", 0)
    metrics = Path(run_dir) / METRICS
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        m.setdefault("models", {})[_model_key(Path(run_dir), path)] = {
            "checkpoint": which,
            "epoch": epoch,
        }
        metrics.write_text(json.dumps(m, indent=2) + "\n")


def recorded_model(run_dir: str | Path, path: str | Path) -> str:
    """What :func:`record_model` noted for ``path``, as words (``"best checkpoint, epoch
    7"``), or ``""``."""
    metrics = Path(run_dir) / METRICS
    if not metrics.is_file():
        return ""
    entry = json.loads(metrics.read_text()).get("models", {}).get(_model_key(Path(run_dir), path))
    return f"{entry['checkpoint']} checkpoint, epoch {entry['epoch']}" if entry else ""
