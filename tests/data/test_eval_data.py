import numpy as np
import pytest
import torch

from dfqkit.data.eval_data import EvalData, TensorImageDataset
from dfqkit.data.stratified_split import parse_holdout, stratified_split


def _data(train: bool = True) -> EvalData:
    images = torch.arange(20 * 4, dtype=torch.float32).reshape(20, 1, 2, 2)
    ds = TensorImageDataset(images, torch.arange(20) % 2)
    return EvalData(
        name="toy",
        num_classes=2,
        image_size=2,
        channels=1,
        mean=(0.0,),
        std=(1.0,),
        val=ds,
        test=ds,
        train=ds if train else None,
    )


def test_loader_yields_batches_of_images_and_labels():
    images, labels = next(iter(_data().loader("test", 8)))
    assert images.shape == (8, 1, 2, 2) and images.dtype == torch.float32
    assert labels.tolist() == [0, 1, 0, 1, 0, 1, 0, 1]


def test_loader_shuffle_depends_on_seed_only_and_keeps_global_rng():
    data = _data()
    state = torch.get_rng_state()
    first = torch.cat([y for _, y in data.loader("train", 5, shuffle=True, seed=3)])
    again = torch.cat([y for _, y in data.loader("train", 5, shuffle=True, seed=3)])
    other = [x[:, 0, 0, 0] for x, _ in data.loader("train", 20, shuffle=True, seed=4)][0]
    ordered = [x[:, 0, 0, 0] for x, _ in data.loader("train", 20, shuffle=True, seed=3)][0]
    assert torch.equal(first, again)
    assert not torch.equal(other, ordered)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("split", ["training", "dev", ""])
def test_unknown_split_is_a_clear_error(split):
    with pytest.raises(ValueError, match="split must be one of train, val, test"):
        _data().loader(split, 4)


def test_missing_train_split_is_named():
    with pytest.raises(ValueError, match="no 'train' split"):
        _data(train=False).loader("train", 4)


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        _data().loader("val", 0)


def test_tensor_dataset_checks_shapes():
    with pytest.raises(ValueError, match="labels must have shape"):
        TensorImageDataset(torch.zeros(3, 1, 2, 2), torch.zeros(4))
    with pytest.raises(ValueError, match=r"\(n, c, h, w\)"):
        TensorImageDataset(torch.zeros(3, 2, 2), torch.zeros(3))


def test_stratified_split_is_disjoint_balanced_and_seeded():
    labels = np.repeat(np.arange(4), 10)
    parts = stratified_split(labels, seed=1, per_class=(5, 2, 3))
    assert [len(p) for p in parts] == [20, 8, 12]
    assert len(set(np.concatenate(parts).tolist())) == 40
    for part, count in zip(parts, (5, 2, 3)):
        assert np.bincount(labels[part]).tolist() == [count] * 4
    again = stratified_split(labels, seed=1, per_class=(5, 2, 3))
    other = stratified_split(labels, seed=2, per_class=(5, 2, 3))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not np.array_equal(parts[0], other[0])


def test_stratified_split_fractions_and_errors():
    labels = np.repeat(np.arange(2), 10)
    val, test = stratified_split(labels, seed=0, fractions=(0.3, 0.7))
    assert np.bincount(labels[val]).tolist() == [3, 3] and len(test) == 14
    with pytest.raises(ValueError, match="has only 10"):
        stratified_split(labels, seed=0, per_class=(8, 8))
    with pytest.raises(ValueError, match="exactly one"):
        stratified_split(labels, seed=0)


def test_parse_holdout():
    assert parse_holdout("test") is None
    assert parse_holdout("0.1") == pytest.approx(0.1)
    for bad in ("1.5", "0", "val", "1"):
        with pytest.raises(ValueError, match="val must be 'test' or a fraction"):
            parse_holdout(bad)
