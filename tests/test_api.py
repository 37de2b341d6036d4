import numpy as np
import pytest
import torch
from PIL import Image

import dfqkit
from dfqkit.quant import act_quantizers

SMALL = dict(epochs=2, iters_per_epoch=2, batch_size=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for cls in ("a", "b", "c"):
        (root / cls).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                root / cls / f"{i}.png"
            )
    return root


@pytest.mark.slow
def test_quantize_a_small_timm_model_with_its_own_data_config(folder, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    student = dfqkit.quantize(
        model,
        method="gdfq",
        w_bits=4,
        a_bits=4,
        data=folder,
        output_dir=tmp_path / "run",
        gin_params=[
            "train.warmup_epochs = 1",
            "train.calib_epochs = 1",
            "train.naive_batches = 1",
            "generators.ConditionalGenerator.width = 16",
        ],
        **SMALL,
    )
    assert act_quantizers(student) and all(q.mode == "frozen" for q in act_quantizers(student))
    assert (tmp_path / "run" / "metrics.json").is_file() and student.run_dir == str(
        tmp_path / "run"
    )
    with torch.no_grad():
        assert student(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


def test_missing_input_config_and_unknown_method_are_named(folder):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    with pytest.raises(ValueError, match="image_size, mean, std not given"):
        dfqkit.quantize(model, data=folder)
    with pytest.raises(ValueError, match="method='gdfg' is no method family"):
        dfqkit.quantize(
            model, method="gdfg", data=folder, image_size=8, mean=(0.5,) * 3, std=(0.5,) * 3
        )
    with pytest.raises(ValueError, match="data= .labelled. or images= .unlabelled., not both"):
        dfqkit.quantize(model, data=folder, images=folder, image_size=8, mean=(0.5,) * 3,
                        std=(0.5,) * 3)  # fmt: skip


def test_every_method_family_resolves_and_add_ons_do_not():
    from dfqkit.api import _method_file

    for family in ("gdfq", "diversity", "qimera", "ait", "adasg", "adadfq", "psaq_vit"):
        assert _method_file(family) == f"gin/methods/{family}.gin"
    with pytest.raises(ValueError, match="no method family"):
        _method_file("plugin")
    assert _method_file("my/experiment.gin") == "my/experiment.gin"


def test_methods_with_their_own_quantizer_get_it():
    from dfqkit import config as cfg
    from dfqkit.api import QUANT_FOR_METHOD, _method_file

    assert QUANT_FOR_METHOD["genie"] == "gin/quant/genie.gin"
    assert QUANT_FOR_METHOD["zeroq"] == "gin/quant/zeroq.gin"
    for method, quant in QUANT_FOR_METHOD.items():
        assert (cfg.REPO_ROOT / _method_file(method)).is_file()
        assert (cfg.REPO_ROOT / quant).is_file()


def test_an_evaldatas_own_input_configuration_is_used_and_a_clash_is_named():
    from dfqkit.api import _data_config
    from dfqkit.data import digits

    data = digits()
    model = torch.nn.Linear(1, 1)
    assert _data_config(model, data, None, None, None) == (8, data.mean, data.std)
    with pytest.raises(ValueError, match="image_size given as 16 but the EvalData says 8"):
        _data_config(model, data, 16, None, None)


@pytest.mark.slow
def test_quantize_without_any_data_selects_on_images_distilled_from_the_teacher(
    teacher_env, tmp_path, capsys
):
    from dfqkit.models import mnist_resnet

    student = dfqkit.quantize(
        mnist_resnet(),
        method="gdfq",
        image_size=28,
        mean=(0.1307,),
        std=(0.3081,),
        channels=1,
        output_dir=tmp_path / "free",
        gin_params=[
            "train.warmup_epochs = 1",
            "train.calib_epochs = 1",
            "train.naive_batches = 1",
            "data.distilled_holdout.num_images = 16",
            "data.distilled_holdout.batch_size = 8",
            "data.distilled_holdout.iterations = 2",
        ],
        **SMALL,
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("dfqkit.quantize: gdfq at W4A4, 2 epochs × 2 iterations of batch 4")
    assert "agreement with the float teacher" in out[0] and "pass epochs=" not in out[0]
    assert out[-1].startswith("agreement with the float teacher: naive ")
    import json

    m = json.loads((tmp_path / "free" / "metrics.json").read_text())
    assert m["evaluation"]["labels"] == "teacher"
    assert m["evaluation"]["data"].startswith("distilled_holdout (16 images")
    assert student(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


@pytest.mark.slow
def test_quantize_on_unlabelled_images_measures_agreement_with_the_float_model(folder, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32)}
    dfqkit.quantize(
        model,
        method="gdfq",
        images=folder,
        output_dir=tmp_path / "u",
        gin_params=["train.warmup_epochs = 1", "train.calib_epochs = 1",
                    "train.naive_batches = 1", "generators.ConditionalGenerator.width = 16"],
        **SMALL,
    )  # fmt: skip
    import json

    m = json.loads((tmp_path / "u" / "metrics.json").read_text())
    assert m["evaluation"] == {"data": "unlabelled_folder", "labels": "teacher"}
