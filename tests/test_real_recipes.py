"""The real-model recipes of every generator-based family run end to end (shrunk to a few
iterations) on a CIFAR-100 test batch and a random ResNet-20 checkpoint written here, exactly as
a user runs them: the recipe plus DATA_ROOT and TEACHER_WEIGHTS."""

import pickle

import numpy as np
import pytest
import torch

from dfqkit.models.cifar_resnet20 import cifar_resnet20
from dfqkit.train import run

FAMILIES = [
    "gdfq", "qimera", "ait", "adasg", "adadfq", "mixup", "image_mixup", "diversity",
    "zeroq", "intraq", "hast", "arc",
]  # fmt: skip
SHRINK = [
    "EPOCHS = 2",
    "ITERS_PER_EPOCH = 1",
    "BATCH_SIZE = 4",
    "train.warmup_epochs = 1",
    "train.calib_epochs = 1",
    "train.naive_batches = 1",
    "train.trackers = None",
]


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("c100")
    rng = np.random.RandomState(0)
    batch = {
        "data": rng.randint(0, 256, size=(20, 3 * 32 * 32)).astype(np.uint8),
        "fine_labels": [i % 100 for i in range(20)],
    }
    (root / "cifar-100-python").mkdir()
    with open(root / "cifar-100-python" / "test", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    torch.manual_seed(0)
    save_file(cifar_resnet20(num_classes=100).state_dict(), root / "r20.safetensors")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_real_recipe_runs(family, cifar100, tmp_path):
    params = [
        f"DATA_ROOT = '{cifar100}'",
        f"TEACHER_WEIGHTS = '{cifar100 / 'r20.safetensors'}'",
        *SHRINK,
    ]
    if family == "diversity":
        params += ["EMBED_EPOCHS = 1", "DIM = 8", "HEADS = 2", "BLOCKS = 1"]
    if family in ("zeroq", "intraq", "hast"):
        params += ["SYNTH_IMAGES = 8", "SYNTH_BATCH = 4", "SYNTH_ITERS = 2"]
        params.append(f"generators.SyntheticSet.cache_dir = '{tmp_path / 'synthetic'}'")
    if family == "zeroq":  # PTQ: one calibration epoch
        params = [p for p in params if not p.startswith(("EPOCHS", "train.warmup"))]
    m = run([f"recipes/{family}/resnet20_cifar100_w4a4.gin"], params, output_dir=tmp_path / "r")
    assert m["epochs_done"] == (1 if family == "zeroq" else 2)
    assert m["w_bits"] == 4 and m["a_bits"] == 4
    assert 0.0 <= m["last"]["test_top1"] <= 100.0
