"""Figures measured with a baseline's official code, for ``dfqkit.bench speed`` to compare with.

The re-created reference (:mod:`dfqkit.bench_reference`) is timed beside dfqkit on the same
machine at the same moment; the figures here are the other anchor: the official code itself,
driven unmodified, measured once on a named machine. They compare with a dfqkit figure only when
the recipe, batch, thread count and machine match and the machine is quiet; the bench prints
the ratio with those conditions, never silently.

Each entry is keyed by ``(recipe, batch_size, threads, device)`` and gives the official
``ms_per_iter`` (median over steady-state training iterations), what was run and where
(docs/results.md, "Speed: GDFQ training step").
"""

from __future__ import annotations

from typing import Any

#: (recipe, batch, threads, device) -> the official code's figures.
OFFICIAL: dict[tuple[str, int, int, str], dict[str, Any]] = {
    ("recipes/gdfq/resnet20_cifar100_w4a4.gin", 64, 1, "cpu"): {
        "ms_per_iter": 676.0,
        "code": "official GDFQ code (xushoukai/GDFQ) at commit a93210e7, driven unmodified",
        "machine": "CPU-2 (2 cores, no GPU), one thread, quiet",
    },
    ("recipes/gdfq/resnet20_cifar100_w4a4.gin", 200, 1, "cpu"): {
        "ms_per_iter": 2488.0,
        "code": "official GDFQ code (xushoukai/GDFQ) at commit a93210e7, driven unmodified",
        "machine": "CPU-2 (2 cores, no GPU), one thread, quiet",
    },
}


def official_figures(
    recipe: str, batch_size: int, threads: int, device: str
) -> dict[str, Any] | None:
    """The official code's figures for this configuration, or ``None`` if none was measured."""
    return OFFICIAL.get((recipe, batch_size, threads, device))


def compare(result: dict[str, Any]) -> dict[str, Any] | None:
    """``{"official": ..., "speedup_vs_official": ...}`` for a ``dfqkit.bench speed`` result of
    dfqkit's own step (not of a reference), or ``None`` when nothing official matches."""
    if result.get("implementation") != "dfqkit":
        return None
    official = official_figures(
        result["recipe"], result["batch_size"], result["threads"], result["device"]
    )
    if official is None:
        return None
    return {
        "official": dict(official),
        "speedup_vs_official": official["ms_per_iter"] / result["ms_per_iter"],
    }
