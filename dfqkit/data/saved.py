"""An evaluation set kept as one safetensors file: how a run directory holds data that no
registered factory can load again (an :class:`EvalData` built by hand and handed to
``dfqkit.quantize``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from dfqkit.data.eval_data import EvalData, TensorImageDataset, data_factory

MAX_BYTES = 2 * 2**30  # beyond this, pass a folder or a factory-made set instead
FORMAT = "dfqkit.eval_data.v1"


def _tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(dataset, TensorImageDataset) and dataset.transform is None:
        return dataset.images.float(), dataset.labels
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack([torch.as_tensor(x).float() for x in images]), torch.tensor(labels)


def save_eval_data(data: EvalData, path: str | Path) -> Path:
    """Write ``data``'s val and test splits (normalized images and labels) and its description
    to ``path`` (safetensors), for :func:`saved`.

    Raises:
        ValueError: the splits would take more than 2 GiB as float32.
    """
    splits = {"val": data.val} if data.val is data.test else {"val": data.val, "test": data.test}
    per_image = 4 * data.channels * data.image_size**2
    size = sum(len(ds) for ds in splits.values()) * per_image
    if size > MAX_BYTES:
        raise ValueError(
            f"the evaluation data {data.name!r} would take {size / 2**30:.1f} GiB to store in the "
            "run directory: pass data= as an image-folder path, or build it with a dfqkit.data "
            "factory (e.g. dfqkit.data.imagenet_folder), which the run records instead"
        )
    tensors = {}
    for split, dataset in splits.items():
        tensors[f"{split}.images"], tensors[f"{split}.labels"] = _tensors(dataset)
    meta = {
        "format": FORMAT,
        "name": data.name,
        "num_classes": str(data.num_classes),
        "image_size": str(data.image_size),
        "channels": str(data.channels),
        "mean": json.dumps(list(data.mean)),
        "std": json.dumps(list(data.std)),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return Path(path)


@data_factory
def saved(*, path: str) -> EvalData:
    """An evaluation set written by :func:`save_eval_data` (val and test; no train split).

    Args:
        path: the safetensors file.
    """
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a dfqkit evaluation set (format {FORMAT})")
        t = {k: f.get_tensor(k) for k in f.keys()}
    val = TensorImageDataset(t["val.images"], t["val.labels"])
    test = TensorImageDataset(t["test.images"], t["test.labels"]) if "test.images" in t else val
    return EvalData(
        name=meta["name"],
        num_classes=int(meta["num_classes"]),
        image_size=int(meta["image_size"]),
        channels=int(meta["channels"]),
        mean=tuple(json.loads(meta["mean"])),
        std=tuple(json.loads(meta["std"])),
        val=val,
        test=test,
    )
