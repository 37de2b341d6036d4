"""CIFAR-10/100 test images from a local torchvision-format folder."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from dfqkit.data.eval_data import EvalData, TensorImageDataset, data_factory, scale_and_normalize
from dfqkit.data.safe_pickle import safe_load
from dfqkit.data.stratified_split import parse_holdout, stratified_split

# num_classes -> (file under root, label key, mean, std)
LAYOUTS: dict[int, tuple[str, str, tuple[float, ...], tuple[float, ...]]] = {
    10: (
        "cifar-10-batches-py/test_batch",
        "labels",
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
    100: (
        "cifar-100-python/test",
        "fine_labels",
        (0.5071, 0.4867, 0.4408),
        (0.2675, 0.2557, 0.2761),
    ),
}
HOLDOUT_SEED = 0


@data_factory
def cifar(*, root: str, num_classes: int = 10, val: str = "test") -> EvalData:
    """The CIFAR-10 or CIFAR-100 test set (10,000 images 32×32), read from ``root``.

    ``root`` is the folder torchvision's ``CIFAR10(root)`` / ``CIFAR100(root)`` uses: it holds
    ``cifar-10-batches-py/test_batch`` or ``cifar-100-python/test``. Nothing is downloaded; the
    pickle is read with an allow-list unpickler (numpy arrays only), so a tampered file cannot
    run code. Images are kept as uint8 and normalized on access with the dataset's usual
    per-channel mean/std.

    Args:
        root: dataset folder.
        num_classes: 10 or 100.
        val: ``"test"`` (default): validation *is* the test set, the published GDFQ-family
            protocol (best epoch picked on test). A fraction string such as ``"0.1"`` holds that
            stratified share of the test set out as validation (fixed seed) and tests on the
            rest, for an unbiased best-epoch number.

    Returns:
        EvalData with ``val`` and ``test``; no train split.
    """
    if num_classes not in LAYOUTS:
        raise ValueError(f"num_classes must be 10 or 100 for CIFAR, got {num_classes!r}")
    subpath, label_key, mean, std = LAYOUTS[num_classes]
    holdout = parse_holdout(val)
    path = Path(root).expanduser() / subpath
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR-{num_classes} test file not found: root={root!r} must contain {subpath!r} "
            f"(the torchvision layout; looked for {path})"
        )
    raw = safe_load(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a CIFAR batch (a dict), got {type(raw).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"{path} lacks the 'data' and {label_key!r} entries of a CIFAR batch")
    data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if labels.shape != (data.shape[0],) or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"{path}: expected {data.shape[0]} labels in 0..{num_classes - 1}, "
            f"got shape {labels.shape} with range {labels.min()}..{labels.max()}"
        )
    transform = functools.partial(
        scale_and_normalize,
        max_value=255.0,
        mean=torch.tensor(mean).view(3, 1, 1),
        std=torch.tensor(std).view(3, 1, 1),
    )
    full = TensorImageDataset(
        torch.from_numpy(data.copy()), torch.from_numpy(labels), transform=transform
    )
    if holdout is None:
        val_set = test_set = full
    else:
        val_idx, test_idx = stratified_split(
            labels, seed=HOLDOUT_SEED, fractions=(holdout, 1.0 - holdout)
        )
        val_set, test_set = (
            full.subset(torch.from_numpy(val_idx)),
            full.subset(torch.from_numpy(test_idx)),
        )
    return EvalData(
        name=f"cifar{num_classes}",
        num_classes=num_classes,
        image_size=32,
        channels=3,
        mean=mean,
        std=std,
        val=val_set,
        test=test_set,
    )
