import os
import pickle

import numpy as np
import pytest
import torch

from dfqkit.data import cifar
from dfqkit.data.safe_pickle import safe_load


def _write_cifar(root, num_classes: int = 10, n: int = 20, *, bytes_keys: bool = False):
    rng = np.random.RandomState(0)
    data = rng.randint(0, 256, size=(n, 3 * 32 * 32)).astype(np.uint8)
    data[0, 1024 + 5 * 32 + 7] = 200  # image 0, channel 1 (green), row 5, col 7
    labels = [i % num_classes for i in range(n)]
    if num_classes == 10:
        path, key = root / "cifar-10-batches-py" / "test_batch", "labels"
    else:
        path, key = root / "cifar-100-python" / "test", "fine_labels"
    batch = {"data": data, key: labels, "filenames": [f"img{i}.png" for i in range(n)]}
    if bytes_keys:  # Python 2 pickles: str keys come back as bytes without an encoding
        batch = {k.encode(): v for k, v in batch.items()}
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return data, labels


def test_cifar10_shapes_labels_and_normalization(tmp_path):
    data, labels = _write_cifar(tmp_path)
    ev = cifar(root=str(tmp_path))
    assert (ev.name, ev.num_classes, ev.image_size, ev.channels) == ("cifar10", 10, 32, 3)
    assert ev.val is ev.test and ev.train is None and len(ev.test) == 20
    image, label = ev.test[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 0
    assert float(image[1, 5, 7]) == pytest.approx((200 / 255 - 0.4822) / 0.2435, abs=1e-5)
    red = data[3, :1024].reshape(32, 32)[10, 11]
    assert float(ev.test[3][0][0, 10, 11]) == pytest.approx((red / 255 - 0.4914) / 0.2470, 1e-5)
    assert [ev.test[i][1] for i in range(20)] == labels
    x, y = next(iter(ev.loader("test", 8)))
    assert x.shape == (8, 3, 32, 32) and y.tolist() == labels[:8]


def test_cifar100_reads_fine_labels_and_its_statistics(tmp_path):
    _, labels = _write_cifar(tmp_path, num_classes=100, n=30, bytes_keys=True)
    ev = cifar(root=str(tmp_path), num_classes=100)
    assert ev.num_classes == 100 and ev.mean == (0.5071, 0.4867, 0.4408)
    assert float(ev.test[0][0][1, 5, 7]) == pytest.approx((200 / 255 - 0.4867) / 0.2557, 1e-5)
    assert ev.test[29][1] == labels[29]


def test_val_fraction_holds_out_part_of_test(tmp_path):
    _write_cifar(tmp_path, n=100)
    ev = cifar(root=str(tmp_path), val="0.2")
    assert (len(ev.val), len(ev.test)) == (20, 80)
    val_bytes = {ev.val.images[i].numpy().tobytes() for i in range(20)}
    assert not val_bytes & {ev.test.images[i].numpy().tobytes() for i in range(80)}
    assert torch.equal(cifar(root=str(tmp_path), val="0.2").val.labels, ev.val.labels)


def test_missing_folder_names_root_and_expected_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"root=.*must contain 'cifar-10-batches-py"):
        cifar(root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="cifar-100-python/test"):
        cifar(root=str(tmp_path), num_classes=100)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_classes must be 10 or 100"):
        cifar(root=str(tmp_path), num_classes=20)
    with pytest.raises(ValueError, match="val must be 'test' or a fraction"):
        cifar(root=str(tmp_path), val="train")


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_executing_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps({"data": exploit, "labels": [0]}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle global"):
        cifar(root=str(tmp_path))
    assert not marker.exists()
    with open(tmp_path / "other.pkl", "wb") as f:
        pickle.dump(torch.nn.Linear(1, 1), f)
    with pytest.raises(pickle.UnpicklingError, match="torch"):
        safe_load(tmp_path / "other.pkl")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_safe_load_reads_numpy_arrays(tmp_path, protocol):
    obj = {"a": np.arange(6, dtype=np.int16).reshape(2, 3), "b": [1, "x"], "c": np.float32(2)}
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    loaded = safe_load(path)
    assert np.array_equal(loaded["a"], obj["a"]) and loaded["b"] == [1, "x"]
    assert loaded["c"] == 2
