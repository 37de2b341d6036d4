"""``train.transforms``: checked at start-up, applied to the student and the naive reference,
rebuilt by the export, and nothing at all when empty."""

import json

import pytest
import torch
from torch import nn

from dfqkit.errors import ConfigError
from dfqkit.export import export_safetensors, load_quantized
from dfqkit.models.mnist_resnet import mnist_resnet
from dfqkit.ptq import BiasCorrection, CrossLayerEqualization, check_transforms
from dfqkit.quant.modules import QuantConv2d
from dfqkit.rundir import load_run
from dfqkit.train import run

TINY = [
    "EPOCHS = 1",
    "ITERS_PER_EPOCH = 1",
    "BATCH_SIZE = 8",
    "train.warmup_epochs = 0",
    "train.calib_epochs = 1",
    "train.naive_batches = 2",
    "train.trackers = None",
    "LATENT_DIM = 8",
    "generators.ConditionalGenerator.width = 16",
]


def test_the_list_is_checked_with_the_fix_named():
    cle, bc = CrossLayerEqualization(), BiasCorrection()
    assert check_transforms([cle, bc]) == [cle, bc] and check_transforms(()) == []
    order = r"\[BiasCorrection\(\) \(quantized\), .*the stages must run in the order \('float', "
    order += r"'rounding', 'quantized'\)"
    with pytest.raises(ConfigError, match=order):
        check_transforms([bc, cle])
    with pytest.raises(ConfigError, match=r"transforms\[0\] is @ptq.BiasCorrection — the class"):
        check_transforms([BiasCorrection])
    with pytest.raises(ConfigError, match=r"transforms\[1\] must be a data-free transform"):
        check_transforms([cle, nn.ReLU()])
    with pytest.raises(ConfigError, match="must be a list of transforms"):
        check_transforms(cle)


def _random_teacher(tmp_path):
    """A random-init ResNet-8 with spread BN parameters (no zoo teacher needed)."""
    torch.manual_seed(0)
    model = mnist_resnet(weights=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 3.0)
                m.bias.normal_()
    path = tmp_path / "teacher.pt"
    torch.save(model.state_dict(), path)
    return f"TEACHER_WEIGHTS = '{path}'"


@pytest.mark.slow
def test_an_explicit_empty_list_changes_nothing(tmp_path):
    weights = _random_teacher(tmp_path)
    recipe = ["recipes/mnist/gdfq_w4a4.gin"]
    plain = run(recipe, [*TINY, weights], output_dir=tmp_path / "plain")
    empty = run(recipe, [*TINY, weights, "train.transforms = []"], output_dir=tmp_path / "empty")
    assert plain["naive"] == empty["naive"]
    assert plain["history"] == empty["history"] and plain["history"]


@pytest.mark.slow
def test_cle_bc_run_equalizes_student_and_reference_and_the_export_rebuilds_it(tmp_path):
    weights = _random_teacher(tmp_path)
    out = tmp_path / "run"
    metrics = run(["recipes/mnist/gdfq_cle_bc_w4a4.gin"], [*TINY, weights], output_dir=out)
    assert 0 <= metrics["naive"]["test_top1"] <= 100
    operative = (out / "operative_config.gin").read_text()
    assert "@ptq.CrossLayerEqualization()" in operative and "@ptq.BiasCorrection()" in operative
    built = load_run(out, which="last")
    teacher, student = built.teacher, built.student_module
    body = "features.stage1.unit1.body"
    # CLE scaled the BN's γ (and β) between the block's two convs; the teacher is untouched
    bn_t = teacher.get_submodule(f"{body}.conv1.bn")
    bn_s = student.get_submodule(f"{body}.conv1.bn")
    assert not torch.allclose(bn_t.weight, bn_s.weight)
    torch.testing.assert_close(bn_t.running_var, bn_s.running_var)
    # BC gave the bias-free conv after that BN a bias; the stem conv (fed by the image) has none
    conv2 = student.get_submodule(f"{body}.conv2.conv")
    assert isinstance(conv2, QuantConv2d) and conv2.bias is not None
    assert teacher.get_submodule(f"{body}.conv2.conv").bias is None
    assert student.get_submodule("features.init_block.conv").bias is None
    # the export rebuilds the same structure and reproduces the student exactly
    exported = export_safetensors(out, which="last")
    images = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_quantized(exported)(images), student(images))
    assert json.loads((out / "metrics.json").read_text())["naive"] == metrics["naive"]
