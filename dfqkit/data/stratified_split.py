"""Seeded, stratified splitting of a labelled set into disjoint parts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def stratified_split(
    labels: np.ndarray,
    *,
    seed: int,
    per_class: Sequence[int] | None = None,
    fractions: Sequence[float] | None = None,
) -> list[np.ndarray]:
    """Split sample indices into disjoint parts with the same class balance.

    Each class's indices are permuted by a local ``numpy.random.RandomState(seed)`` (global RNG
    state is neither read nor changed), then cut into consecutive parts. The result depends only
    on ``labels`` and ``seed``.

    Args:
        labels: ``(n,)`` integer labels.
        seed: split seed.
        per_class: number of samples of every class in each part (e.g. ``(300, 50, 150)``);
            their sum may not exceed the smallest class.
        fractions: alternatively, the fraction of every class in each part (summing to at most
            1); boundaries are rounded per class.

    Returns:
        One sorted int64 index array per part.
    """
    if (per_class is None) == (fractions is None):
        raise ValueError("give exactly one of per_class or fractions")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-d, got shape {labels.shape}")
    if fractions is not None:
        if any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
            raise ValueError(f"fractions must be >= 0 and sum to at most 1, got {fractions}")
    rng = np.random.RandomState(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(per_class or fractions or ()))]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        if per_class is not None:
            if sum(per_class) > len(members):
                raise ValueError(
                    f"per_class={tuple(per_class)} needs {sum(per_class)} samples of class "
                    f"{cls}, which has only {len(members)}"
                )
            bounds = np.cumsum([0, *per_class])
        else:
            bounds = np.round(np.cumsum([0.0, *fractions]) * len(members)).astype(int)
        for part, start, stop in zip(parts, bounds[:-1], bounds[1:]):
            part.append(members[start:stop])
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def parse_holdout(val: str) -> float | None:
    """Read a factory's ``val`` argument: ``"test"`` → ``None``, ``"0.1"`` → ``0.1``.

    ``"test"`` means the validation split *is* the test split; a fraction in (0, 1) holds that
    share of the test set out as validation and tests on the rest.
    """
    if val == "test":
        return None
    try:
        fraction = float(val)
    except (TypeError, ValueError):
        fraction = float("nan")
    if not 0.0 < fraction < 1.0:
        raise ValueError(
            f"val must be 'test' or a fraction string in (0, 1) such as '0.1', got {val!r}"
        )
    return fraction
