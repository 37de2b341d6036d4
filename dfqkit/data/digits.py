"""scikit-learn's 8×8 digits, for tiny unit tests."""

from __future__ import annotations

import torch

from dfqkit.data.eval_data import EvalData, TensorImageDataset, data_factory
from dfqkit.data.stratified_split import stratified_split
from dfqkit.optional import require

# Mean and std of all 1,797 images after scaling 0..16 to [0, 1].
MEAN = 0.3053
STD = 0.3760
FRACTIONS = (0.6, 0.2, 0.2)  # train, val, test share of every class


@data_factory
def digits(*, seed: int = 0) -> EvalData:
    """scikit-learn ``load_digits``: 1,797 images 8×8 (values 0..16), 10 classes.

    Split by ``seed`` into stratified 60/20/20 % train/val/test; pixels scaled to [0, 1] and
    normalized with mean 0.3053, std 0.3760.

    Args:
        seed: split seed.

    Returns:
        EvalData of in-memory ``(1, 8, 8)`` images.

    Raises:
        MissingDependency: scikit-learn is not installed.
    """
    datasets = require(
        "sklearn.datasets", extra="data", purpose="data.digits", package="scikit-learn"
    )
    x, y = datasets.load_digits(return_X_y=True)
    images = ((torch.from_numpy(x).float() / 16.0 - MEAN) / STD).reshape(-1, 1, 8, 8)
    labels = torch.from_numpy(y).long()
    train, val, test = (
        TensorImageDataset(images[idx], labels[idx])
        for idx in stratified_split(y, seed=seed, fractions=FRACTIONS)
    )
    return EvalData(
        name="digits",
        num_classes=10,
        image_size=8,
        channels=1,
        mean=(MEAN,),
        std=(STD,),
        val=val,
        test=test,
        train=train,
    )
