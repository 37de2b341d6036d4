import pytest
import torch
from PIL import Image

from dfqkit.data import imagenet_folder

COLORS = {"n02_b": (255, 0, 0), "n01_a": (0, 128, 255), "n03_c": (10, 20, 30)}


@pytest.fixture
def root(tmp_path):
    for name, color in COLORS.items():
        (tmp_path / name).mkdir()
        for i, ext in enumerate((".PNG", ".png")):
            Image.new("RGB", (40, 30), color).save(tmp_path / name / f"img{i}{ext}")
        (tmp_path / name / "notes.txt").write_text("not an image")
    return tmp_path


def test_shapes_classes_in_sorted_order_and_normalization(root):
    ev = imagenet_folder(root=str(root), image_size=16, resize=20)
    assert (ev.num_classes, ev.image_size, ev.channels) == (3, 16, 3)
    assert len(ev.test) == 6 and ev.val is ev.test
    labels = [ev.test[i][1] for i in range(6)]
    assert labels == [0, 0, 1, 1, 2, 2]  # n01_a, n02_b, n03_c
    image, label = ev.test[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = [(c / 255 - m) / s for c, m, s in zip(COLORS["n01_a"], mean, std)]
    assert image[:, 8, 8].tolist() == pytest.approx(expected, abs=1e-5)
    x, y = next(iter(ev.loader("test", 4, num_workers=0)))
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 0, 1, 1]


def test_val_fraction(root):
    ev = imagenet_folder(root=str(root), image_size=8, resize=8, val="0.5")
    assert len(ev.val) == 3 and len(ev.test) == 3
    assert sorted(ev.val[i][1] for i in range(3)) == [0, 1, 2]


def test_errors(tmp_path, root):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        imagenet_folder(root=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-directories"):
        imagenet_folder(root=str(tmp_path / "empty"))
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(ValueError, match="no images"):
        imagenet_folder(root=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="interpolation must be one of"):
        imagenet_folder(root=str(root), interpolation="lanczos")
    with pytest.raises(ValueError, match="image_size <= resize"):
        imagenet_folder(root=str(root), image_size=224, resize=200)
