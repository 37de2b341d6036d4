"""Genie-M's block reconstruction: units, what one unit's optimisation does, the trainer stage
(checkpoint per unit, best = last = the reconstructed student) and bit-identical resume."""

import copy
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from dfqkit import checkpoint as ckpt
from dfqkit.models.mnist_resnet import mnist_resnet
from dfqkit.ptq import BlockReconstruction
from dfqkit.quant import (
    AdaRoundWeightQuantizer,
    LSQActQuantizer,
    MinMaxWeightQuantizer,
    QuantConfig,
    quantize_,
    set_quant_mode,
)
from dfqkit.quant.search import symmetric_bounds
from dfqkit.rundir import load_run
from dfqkit.train import run


def _pair(bits=3, weight_quantizer=AdaRoundWeightQuantizer):
    torch.manual_seed(0)
    teacher = mnist_resnet(depth=8, width=8, weights=None).eval()
    for m in teacher.modules():  # a non-trivial BN so units differ from the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    cfg = QuantConfig(w_bits=bits, a_bits=bits, policy="layer_inputs",
                      weight_quantizer=weight_quantizer, act_quantizer=LSQActQuantizer)  # fmt: skip
    images = torch.randn(64, 1, 28, 28)
    student = quantize_(copy.deepcopy(teacher), cfg, images[:2]).eval()
    with torch.no_grad():
        student(images)  # observe the step sizes
    set_quant_mode(student, "frozen")
    return teacher, student, images


def test_units_are_blocks_and_lone_layers_in_execution_order():
    teacher, student, images = _pair()
    rec = BlockReconstruction(iterations=1, batch_size=8, num_samples=64)
    names = [u.name for u in rec.units(teacher, student, images[:2])]
    assert names == [
        "features.init_block",
        "features.stage1.unit1",
        "features.stage2.unit1",
        "features.stage3.unit1",
        "output",
    ]
    only_layers = BlockReconstruction(iterations=1, batch_size=8, num_samples=64, units=[])
    layers = [u.name for u in only_layers.units(teacher, student, images[:2])]
    assert layers[0] == "features.init_block.conv" and layers[-1] == "output"
    assert len(layers) == 1 + 3 * 2 + 2 + 1  # stem, 2 convs per unit, 2 identity convs, fc


def _unit_error(teacher, student, unit, images):
    rec = BlockReconstruction(iterations=1, batch_size=16, num_samples=64)
    x, x_q, y = rec._record(teacher, student, unit, images)
    with torch.no_grad():
        return (unit.student(x_q) - y).pow(2).sum(1).mean().item()


def test_reconstructing_a_unit_lowers_its_output_error_and_ends_hard():
    teacher, student, images = _pair(bits=2)
    lrs = {"lr_rounding": 1e-2, "lr_weight_scale": 1e-3, "lr_act_scale": 1e-3}
    rec = BlockReconstruction(iterations=300, batch_size=16, num_samples=64, warmup=0.2, **lrs)
    unit = rec.units(teacher, student, images[:2])[2]
    before = _unit_error(teacher, student, unit, images)
    rec.reconstruct_unit(teacher, student, unit, images, seed=0)
    after = _unit_error(teacher, student, unit, images)
    assert after < 0.8 * before
    weights = [m for m in unit.student.modules() if isinstance(m, AdaRoundWeightQuantizer)]
    acts = [m for m in unit.student.modules() if isinstance(m, LSQActQuantizer)]
    assert weights and acts
    assert not any(w.soft for w in weights) and not any(a.learning for a in acts)
    for a in acts:  # ranges written back from the learned step size
        lo, hi = symmetric_bounds(a.scale.detach(), a.signed, a.bits)
        assert torch.equal(a.lo, lo) and torch.equal(a.hi, hi)
    # parameters outside the learned ones are untouched and still trainable
    assert all(p.requires_grad for p in unit.student.parameters())
    # the annealed regulariser pushed the rounding towards 0 or 1
    h = torch.sigmoid(weights[0].logits) * 1.2 - 0.1
    assert ((h.clamp(0, 1) - 0.5).abs() > 0.4).float().mean() > 0.5


def test_unit_reconstruction_is_seeded():
    results = []
    for _ in range(2):
        teacher, student, images = _pair()
        rec = BlockReconstruction(iterations=20, batch_size=16, num_samples=64)
        unit = rec.units(teacher, student, images[:2])[1]
        rec.reconstruct_unit(teacher, student, unit, images, seed=5)
        results.append({k: v.clone() for k, v in unit.student.state_dict().items()})
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_check_and_arguments():
    _, student, _ = _pair(weight_quantizer=MinMaxWeightQuantizer)
    with pytest.raises(ValueError, match="AdaRoundWeightQuantizer.*MinMaxWeightQuantizer"):
        BlockReconstruction().check(student)
    with pytest.raises(ValueError, match="iterations must be a positive integer"):
        BlockReconstruction(iterations=0)
    with pytest.raises(ValueError, match="beta must be two positive numbers"):
        BlockReconstruction(beta=(20.0,))
    with pytest.raises(ValueError, match="warmup must be in"):
        BlockReconstruction(warmup=1.0)


def test_unit_checkpoints_sort_after_their_epoch(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("epoch-0001", "epoch-0001-unit-0002", "epoch-0001-unit-0010"):
        (root / name).mkdir(parents=True)
        (root / name / ckpt.COMPLETE).write_text("1\n")
    assert ckpt.latest_checkpoint(tmp_path).name == "epoch-0001-unit-0010"


TINY = ["SYNTH_IMAGES = 32", "SYNTH_BATCH = 16", "SYNTH_ITERS = 2", "BATCH_SIZE = 16",
        "ITERS_PER_EPOCH = 2", "RECON_SAMPLES = 32", "RECON_BATCH = 8", "RECON_ITERS = 6",
        "train.naive_batches = 2", "train.trackers = None"]  # fmt: skip
RECIPE = "recipes/mnist/genie_w4a4.gin"


@pytest.mark.slow
def test_genie_recipe_reconstructs_every_unit_and_reports_that_result(teacher_env, tmp_path):
    out = tmp_path / "g"
    m = run([RECIPE], TINY, output_dir=out)
    assert [h.get("stage") for h in m["history"]] == [None, "reconstructed"]
    assert m["best"]["test_top1"] == m["last"]["test_top1"] == m["history"][-1]["test_top1"]
    assert ckpt.latest_checkpoint(out).name == "epoch-0001-unit-0005"
    # ms_per_iter is the epochs' iterations alone; the reconstruction is timed apart
    assert m["post_training_s"] > 0
    assert m["time_s"] == pytest.approx(
        m["ms_per_iter"] * m["iterations"] / 1000 + m["post_training_s"]
    )
    # and per phase: PTQ never trains the student, its epoch is calibration
    phases = m["phase_seconds"]
    assert set(phases) == {
        "synthesis", "references", "calibration", "evaluation", "reconstruction"
    }  # fmt: skip
    assert all(v > 0 for v in phases.values())
    assert phases["reconstruction"] == pytest.approx(m["post_training_s"])
    assert phases["calibration"] == pytest.approx(m["ms_per_iter"] * m["iterations"] / 1000)
    assert m["float_layers"] == []  # every conv and linear of the ResNet-8 is quantized
    student = load_run(out).student_module
    w = [mod for mod in student.modules() if isinstance(mod, AdaRoundWeightQuantizer)]
    assert w and not any(q.soft for q in w)
    # first and last layers at 8 bits, second layer's input at 8 bits (Genie's convention)
    assert w[0].bits == 8 and w[-1].bits == 8 and w[1].bits == 4
    assert student.features.stage1.unit1.body.conv1.conv.input_quant.bits == 8
    assert student.features.stage1.unit1.body.conv2.conv.input_quant.bits == 4


DRIVER = """
import os, signal, sys
from dfqkit.ptq import reconstruction as r
calls = {"n": 0}
original = r.BlockReconstruction.reconstruct_unit
def dying(self, *a, **k):
    out = original(self, *a, **k)
    calls["n"] += 1
    if calls["n"] == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    return out
r.BlockReconstruction.reconstruct_unit = dying
from dfqkit.train import main
sys.exit(main(sys.argv[2:]))
"""


def _cli(tmp_path, out, at, resume=False):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    cmd = [sys.executable, str(script), str(at), "--gin", RECIPE, "--output_dir", str(out)]
    for p in TINY:
        cmd += ["--gin_param", p]
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_run_killed_inside_the_reconstruction_resumes_bit_identical(teacher_env, tmp_path):
    from safetensors.torch import load_file

    ref = _cli(tmp_path, tmp_path / "ref", at=0)
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = _cli(tmp_path, tmp_path / "k", at=3)  # unit 3 finished, not yet saved
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert ckpt.latest_checkpoint(tmp_path / "k").name == "epoch-0001-unit-0002"
    resumed = _cli(tmp_path, tmp_path / "k", at=0, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads((tmp_path / "k" / "metrics.json").read_text())
    want = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert got["history"] == want["history"] and got["best"] == want["best"]
    last_k, last_ref = (ckpt.latest_checkpoint(tmp_path / d) for d in ("k", "ref"))
    files = sorted(f.name for f in last_ref.glob("model*.safetensors"))
    assert files and files == sorted(f.name for f in last_k.glob("model*.safetensors"))
    for name in files:
        a, b = load_file(last_k / name), load_file(last_ref / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("weight_quant.logits") for k in load_file(last_ref / files[-1]))


def test_a_reconstruction_that_lowers_validation_is_said():
    """The reconstructed student is the run's result (best and last): when it validates below
    the student before it, the run says so with both figures and the fix (metrics.json
    ``warnings``, the log and the command line's last lines)."""
    from dfqkit.train import reconstruction_warnings

    calibrated = {"epoch": 1, "phase": "calibration", "val_top1": 76.5625, "test_top1": 72.65625}
    lower = {"epoch": 1, "stage": "reconstructed", "val_top1": 65.625, "test_top1": 70.3125}
    (line,) = reconstruction_warnings([calibrated, lower], 50)
    assert "from 76.56 (epoch 1, before it; test 72.66) to 65.62 (test 70.31)" in line
    assert "(50 steps per unit)" in line and "ptq.BlockReconstruction.iterations" in line
    higher = dict(lower, val_top1=80.0)
    assert reconstruction_warnings([calibrated, higher], None) == []
    assert reconstruction_warnings([calibrated, dict(lower, val_top1=76.5625)], None) == []
    assert reconstruction_warnings([calibrated], None) == []  # no reconstruction
    assert reconstruction_warnings([lower], None) == []  # nothing validated before it
