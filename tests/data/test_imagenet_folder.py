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


def test_wordnet_id_directories_get_their_imagenet_index_even_for_a_subset(tmp_path):
    # three of the 1,000 classes: tench (0), goldfish (1) and the last class, toilet tissue (999)
    for wnid in ("n15075141", "n01443537", "n01440764"):
        (tmp_path / wnid).mkdir()
        Image.new("RGB", (12, 12), (9, 9, 9)).save(tmp_path / wnid / "0.png")
    ev = imagenet_folder(root=str(tmp_path), image_size=8, resize=8)
    assert ev.num_classes == 1000
    assert [ev.test[i][1] for i in range(3)] == [0, 1, 999]
    # the sorted numbering is still there on request (a 3-class model trained on these dirs)
    ev3 = imagenet_folder(root=str(tmp_path), image_size=8, resize=8, class_index="sorted")
    assert ev3.num_classes == 3 and [ev3.test[i][1] for i in range(3)] == [0, 1, 2]
    # a held-out validation share keeps the real indices
    ev_val = imagenet_folder(root=str(tmp_path), image_size=8, resize=8, val="0.5")
    assert {ev_val.test[i][1] for i in range(len(ev_val.test))} <= {0, 1, 999}


def test_wordnet_ids_outside_imagenet1k_and_bad_class_index_are_refused(tmp_path, root):
    (tmp_path / "wn" / "n00000001").mkdir(parents=True)
    Image.new("RGB", (12, 12)).save(tmp_path / "wn" / "n00000001" / "0.png")
    with pytest.raises(ValueError, match="n00000001 are not ImageNet-1k WordNet ids.*'sorted'"):
        imagenet_folder(root=str(tmp_path / "wn"), image_size=8, resize=8)
    with pytest.raises(ValueError, match="not ImageNet-1k WordNet ids"):
        imagenet_folder(root=str(root), image_size=8, resize=8, class_index="imagenet1k")
    with pytest.raises(ValueError, match="class_index must be one of auto, sorted, imagenet1k"):
        imagenet_folder(root=str(root), image_size=8, resize=8, class_index="wordnet")
