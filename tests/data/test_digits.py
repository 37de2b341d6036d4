import sys

import numpy as np
import pytest
import torch

from dfqkit.data import digits


def test_digits_splits_shapes_and_normalization():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    data = digits()
    sizes = (len(data.train), len(data.val), len(data.test))
    assert sum(sizes) == 1797 and sizes[0] == pytest.approx(0.6 * 1797, abs=10)
    assert (data.num_classes, data.image_size, data.channels) == (10, 8, 1)
    assert data.train[0][0].shape == (1, 8, 8)
    for split in (data.train, data.val, data.test):
        counts = torch.bincount(split.labels, minlength=10)
        assert counts.min() > 0.8 * counts.max()
    x, _ = load_digits(return_X_y=True)
    all_images = torch.cat([data.train.images, data.val.images, data.test.images])
    expected = np.sort((x / 16.0 - 0.3053) / 0.3760, axis=None)
    assert np.allclose(np.sort(all_images.numpy(), axis=None), expected, atol=1e-5)
    assert torch.equal(digits().test.labels, data.test.labels)


def test_missing_sklearn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        digits()
