"""The offline model zoo: teachers trained here on the offline testbed and cached.

Command line::

    python -m dfqkit.zoo list
    python -m dfqkit.zoo train mnist_resnet8 [--force] [--seed 0] [--epochs N]
    python -m dfqkit.zoo path mnist_resnet8

A trained teacher is ``<cache>/NAME.safetensors`` plus ``NAME.json`` (its metrics), where
``<cache>`` is ``$DFQKIT_CACHE/zoo`` if the variable is set, else ``~/.cache/dfqkit/zoo``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfqkit.data.eval_data import EvalData
from dfqkit.data.mnist5k import mnist5k
from dfqkit.models.fit_teacher import TrainRecipe, fit_teacher
from dfqkit.models.mnist_resnet import mnist_resnet
from dfqkit.models.mnist_vit import mnist_vit
from dfqkit.models.zoo_cache import cache_dir, trained_weights, weights_path

__all__ = ["ZOO", "ZooEntry", "cache_dir", "ensure_teacher", "metrics_path", "train_teacher",
           "zoo_path"]  # fmt: skip
logger = logging.getLogger(__name__)
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """A teacher the zoo can train.

    Attributes:
        name: zoo name (file stem in the cache).
        description: one line for ``python -m dfqkit.zoo list``.
        build: returns the randomly initialized model (called under the training seed).
        data: returns the EvalData to train (train split), select (val) and score (test) on.
        recipe: optimization settings.
    """

    name: str
    description: str
    build: Callable[[], nn.Module]
    data: Callable[[], EvalData]
    recipe: TrainRecipe


def _mnist_resnet8() -> nn.Module:
    return mnist_resnet(depth=8, weights=None)


def _mnist_vit() -> nn.Module:
    return mnist_vit(weights=None)


# The zoo. Add a teacher by adding a row.
ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry(
            name="mnist_resnet8",
            description="ResNet-8 with BN (78k params) on the MNIST-5k train split",
            build=_mnist_resnet8,
            data=mnist5k,  # split seed 0, as in every recipe
            # ~98.7 % test top-1 (seed 0) in 1-2 min on 2 CPU cores.
            recipe=TrainRecipe(
                epochs=30,
                batch_size=64,
                lr=0.1,
                weight_decay=5e-4,
                max_shift=2,
                max_rotation=12.0,
                max_scale=0.1,
            ),
        ),
        ZooEntry(
            name="mnist_vit",
            description="ViT (4 blocks, dim 64, 7×7 patches, no BN; 137k params) on MNIST-5k",
            build=_mnist_vit,
            data=mnist5k,
            recipe=TrainRecipe(
                epochs=60,
                batch_size=64,
                optimizer="adamw",
                lr=2e-3,
                weight_decay=0.05,
                warmup_epochs=3,
                max_shift=2,
                max_rotation=12.0,
                max_scale=0.1,
            ),
        ),
    )
}


def _entry(name: str) -> ZooEntry:
    if name not in ZOO:
        close = difflib.get_close_matches(name, list(ZOO), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown zoo teacher {name!r}; valid names: {', '.join(ZOO)}.{hint}")
    return ZOO[name]


def zoo_path(name: str) -> Path:
    """Where the weights of zoo teacher ``name`` are (or will be) cached."""
    return weights_path(_entry(name).name)


def metrics_path(name: str) -> Path:
    """Where the metrics of zoo teacher ``name`` are (or will be) cached."""
    return zoo_path(name).with_suffix(".json")


def ensure_teacher(name: str) -> Path:
    """The cached weights of ``name``; fails with the command that creates them if missing."""
    return trained_weights(_entry(name).name)


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train_teacher(
    name: str,
    *,
    seed: int = 0,
    force: bool = False,
    epochs: int | None = None,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Train zoo teacher ``name`` and cache it; returns its metrics.

    If it is already cached and ``force`` is false, nothing is trained and the cached metrics
    are returned. The global RNG state and torch's thread count are restored afterwards.

    CPU kernels sum in an order that depends on the thread count, so the same seed trained
    with one thread and with two gives different teachers (on the offline testbed: test top-1
    98.93 vs 98.60), and a 3-bit student's floor can move by tens of points between such
    teachers (docs/results.md, "Offline teacher").
    The default trains on one thread, so the weights do not depend on the machine's core count.

    Args:
        name: a key of :data:`ZOO`.
        seed: training seed (model init, shuffling, augmentation); the data split is fixed.
        force: retrain even if cached.
        epochs: override the recipe's epoch count (short runs for tests).
        threads: CPU threads to train with (``None``: torch's current setting).
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):  # fmt: skip
        raise ValueError(f"threads must be an integer >= 1 or None, got {threads!r}")
    from safetensors.torch import save_file

    entry = _entry(name)
    path, json_path = zoo_path(name), metrics_path(name)
    if path.is_file() and not force:
        logger.info("%s is already trained (%s); pass force=True to retrain", name, path)
        return json.loads(json_path.read_text()) if json_path.is_file() else {}
    recipe = entry.recipe
    if epochs is not None:
        recipe = dataclasses.replace(recipe, epochs=epochs)
    data = entry.data()
    previous_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = entry.build()
            state, metrics = fit_teacher(model, data, recipe=recipe, seed=seed)
        metrics = {"name": name, **metrics, "threads": torch.get_num_threads()}
    finally:
        torch.set_num_threads(previous_threads)
    text = json.dumps(metrics, indent=2) + "\n"
    # Metrics first: a weights file present implies its metrics are too.
    _write_atomic(json_path, lambda tmp: Path(tmp).write_text(text))
    meta = {"name": name, "seed": str(seed), "test_top1": f"{metrics['test_top1']:.2f}"}
    _write_atomic(path, lambda tmp: save_file(state, tmp, metadata=meta))
    logger.info("saved %s: test top-1 %.2f%% -> %s", name, metrics["test_top1"], path)
    return metrics


def main(argv: list[str] | None = None, *, prog: str = "python -m dfqkit.zoo") -> int:
    """``python -m dfqkit.zoo {list,train,path}``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the zoo's teachers and whether they are cached")
    train = commands.add_parser("train", help="train a teacher and cache it")
    train.add_argument("name")
    train.add_argument("--force", action="store_true", help="retrain even if cached")
    train.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    train.add_argument("--epochs", type=int, default=None, help="override the epoch count")
    train.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads to train with (default 1: the same teacher on any machine's core "
        "count; 0: torch's current setting)",
    )
    path = commands.add_parser("path", help="print where a teacher's weights are cached")
    path.add_argument("name")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.command == "list":
            for entry in ZOO.values():
                json_path = metrics_path(entry.name)
                status = "not trained"
                if zoo_path(entry.name).is_file() and json_path.is_file():
                    status = f"test top-1 {json.loads(json_path.read_text())['test_top1']:.2f}%"
                print(f"{entry.name:20s} {status:22s} {entry.description}")
        elif args.command == "path":
            print(zoo_path(args.name))
            return 0 if zoo_path(args.name).is_file() else 1
        else:
            m = train_teacher(
                args.name,
                seed=args.seed,
                force=args.force,
                epochs=args.epochs,
                threads=args.threads or None,
            )
            print(
                f"{args.name}: test top-1 {m.get('test_top1', float('nan')):.2f}% "
                f"(val {m.get('val_top1', float('nan')):.2f}%, epoch {m.get('best_epoch')}, "
                f"{m.get('seconds')} s) -> {zoo_path(args.name)}"
            )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
