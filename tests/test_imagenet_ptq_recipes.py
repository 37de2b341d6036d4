"""The ImageNet recipes of Genie (Genie-D + Genie-M) and DSG's QAT variant run end to end, shrunk,
on a tiny image folder (2 classes) and random weights written here (torchvision's models and
dfqkit's pytorchcv-layout ones), exactly as a user runs them: the recipe plus DATA_ROOT and
TEACHER_WEIGHTS."""

import numpy as np
import pytest
import torch
from PIL import Image

from dfqkit import checkpoint as ckpt
from dfqkit.models import mobilenet_w1, shufflenet_g1_w1, sqnxt23_w2, torchvision_model
from dfqkit.train import run

COMMON = ["NUM_CLASSES = 2", "train.naive_batches = 1", "train.trackers = None", "BATCH_SIZE = 4"]
GENIE = ["SYNTH_IMAGES = 8", "SYNTH_BATCH = 4", "SYNTH_ITERS = 2", "ITERS_PER_EPOCH = 2",
         "RECON_SAMPLES = 8", "RECON_BATCH = 4", "RECON_ITERS = 2",
         # the L2.4 searches are tested on their own; min/max init keeps this test quick
         "quantizers.LSQActQuantizer.init = 'minmax'",
         "quantizers.AdaRoundWeightQuantizer.init = 'minmax'"]  # fmt: skip
QAT = ["EPOCHS = 2", "ITERS_PER_EPOCH = 1", "train.warmup_epochs = 1", "train.calib_epochs = 1"]
ZEROQ = ["SYNTH_IMAGES = 4", "SYNTH_BATCH = 4", "SYNTH_ITERS = 2"]
INTRAQ = QAT + ["SYNTH_IMAGES = 8", "SYNTH_BATCH = 4", "SYNTH_ITERS = 2"]  # two-stage QAT


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    import torchvision
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("in")
    rng = np.random.RandomState(0)
    for c in ("n01", "n02"):
        (root / "val" / c).mkdir(parents=True)
        for i in range(2):
            pixels = rng.randint(0, 256, size=(80, 96, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(root / "val" / c / f"{i}.JPEG")
    torch.manual_seed(0)
    for name in ("resnet18", "mobilenet_v2"):
        model = getattr(torchvision.models, name)(num_classes=2)
        save_file(model.state_dict(), root / f"{name}.safetensors")
    # dfqkit's extra architectures, and InceptionV3 with the auxiliary head its recipes build
    # away (the checkpoint keeps it, as torchvision's does)
    for name in ("regnet_x_600mf", "mnasnet2_0"):
        model = torchvision_model(name=name, num_classes=2)
        save_file(model.state_dict(), root / f"{name}.safetensors")
    model = torchvision_model(name="inception_v3", num_classes=2, kwargs={"init_weights": False})
    save_file(model.state_dict(), root / "inception_v3.safetensors")
    # pytorchcv's layout, built by dfqkit
    for factory in (shufflenet_g1_w1, sqnxt23_w2, mobilenet_w1):
        save_file(factory(num_classes=2).state_dict(), root / f"{factory.__name__}.safetensors")
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, model, extra, units",
    [
        ("genie/resnet18_imagenet_w4a4", "resnet18", GENIE, 10),  # conv1, 8 blocks, fc
        ("genie/mobilenet_v2_imagenet_w4a4", "mobilenet_v2", GENIE, 20),  # stem, 17, head, fc
        ("dsg/resnet18_imagenet_qat_w4a4", "resnet18", QAT, 0),
        ("genie/regnet_x_600mf_imagenet_w4a4", "regnet_x_600mf", GENIE, 18),  # stem, 16, fc
        # stem conv, the two lone convs of the separable stem, 16 blocks, head conv, fc
        ("genie/mnasnet2_0_imagenet_w4a4", "mnasnet2_0", GENIE, 21),
        ("dsg/inception_v3_imagenet_qat_w4a4", "inception_v3", QAT, 0),  # 299 = 4·75 - 1
        ("zeroq/inception_v3_imagenet_w8a8", "inception_v3", ZEROQ, 0),
        ("zeroq/shufflenet_g1_w1_imagenet_w8a8", "shufflenet_g1_w1", ZEROQ, 0),
        ("zeroq/sqnxt23_w2_imagenet_w8a8", "sqnxt23_w2", ZEROQ, 0),
        ("dsg/shufflenet_g1_w1_imagenet_qat_w4a4", "shufflenet_g1_w1", QAT, 0),
        ("intraq/mobilenet_w1_imagenet_w4a4", "mobilenet_w1", INTRAQ, 0),
    ],
)
def test_imagenet_recipe_runs(recipe, model, extra, units, imagenet, tmp_path):
    params = [
        f"DATA_ROOT = '{imagenet / 'val'}'",
        f"TEACHER_WEIGHTS = '{imagenet / f'{model}.safetensors'}'",
        f"generators.SyntheticSet.cache_dir = '{tmp_path / 'synthetic'}'",
        *COMMON,
        *extra,
    ]
    if extra is QAT:
        params = [p for p in params if not p.startswith("generators.SyntheticSet")]
    out = tmp_path / "r"
    m = run([f"recipes/{recipe}.gin"], params, output_dir=out)
    bits = int(recipe[-1])
    assert m["w_bits"] == bits and m["a_bits"] == bits
    assert 0.0 <= m["last"]["test_top1"] <= 100.0
    if units:
        assert m["history"][-1]["stage"] == "reconstructed"
        assert ckpt.latest_checkpoint(out).name == f"epoch-0001-unit-{units:04d}"
    elif extra in (QAT, INTRAQ):
        assert m["epochs_done"] == 2
    else:  # PTQ calibration only: one pass, no student step
        assert m["epochs_done"] == 1
