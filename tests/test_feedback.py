"""What a run tells its user: honest model selection, per-epoch feedback, and the one line
printed when it stops early or cannot start a part."""

import copy
import dataclasses
import functools
import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from dfqkit import checks
from dfqkit.diagnose import run_labels
from dfqkit.errors import ConfigError, MissingDependency
from dfqkit.registry import _REGISTRY, Entry
from dfqkit.train import run

TINY = [
    "ITERS_PER_EPOCH = 2",
    "BATCH_SIZE = 8",
    "train.naive_batches = 2",
    "LATENT_DIM = 8",
    "generators.ConditionalGenerator.width = 16",
    "train.trackers = None",
]
RECIPE = "recipes/mnist/gdfq_w4a4.gin"


@pytest.mark.slow
def test_best_is_chosen_among_epochs_that_trained_the_student(teacher_env, tmp_path):
    m = run(
        [RECIPE],
        [*TINY, "EPOCHS = 4", "train.warmup_epochs = 2", "train.calib_epochs = 2"],
        output_dir=tmp_path / "r",
    )
    phases = [h["phase"] for h in m["history"]]
    assert phases == ["calibration", "calibration", "training", "training"]
    assert m["best"]["epoch"] in (3, 4)  # never a calibration epoch
    best = max((h for h in m["history"][2:]), key=lambda h: h["val_top1"])
    assert m["best"]["test_top1"] == best["test_top1"]
    calibrated = m["history"][1]  # after calibration, before any student step
    assert m["calibrated"] == {k: calibrated[k] for k in ("epoch", "val_top1", "test_top1")}
    # every epoch's loss means, in the history
    assert set(m["history"][0]["losses"]) == {"gen/SoftTargetCE", "gen/BNStatsLoss"}
    assert set(m["history"][3]["losses"]) == {
        "gen/SoftTargetCE",
        "gen/BNStatsLoss",
        "student/KDLoss",
        "student/SoftTargetCE",
    }
    assert all(v == v for h in m["history"] for v in h["losses"].values())  # finite means


@pytest.mark.slow
def test_a_run_that_never_trains_the_student_reports_its_latest_evaluation(teacher_env, tmp_path):
    m = run([RECIPE], [*TINY, "EPOCHS = 2", "train.warmup_epochs = 2", "train.calib_epochs = 1"],
            output_dir=tmp_path / "ptq")  # fmt: skip
    assert m["best"]["epoch"] == 2 and m["calibrated"] is None
    assert m["best"]["test_top1"] == m["last"]["test_top1"]


@pytest.mark.slow
def test_the_attention_mixer_and_learned_clips_are_in_the_history(teacher_env, tmp_path):
    m = run(
        ["recipes/mnist/diversity_w4a4.gin"],
        [
            *TINY,
            "EPOCHS = 2",
            "train.warmup_epochs = 1",
            "train.calib_epochs = 1",
            "DIM = 8",
            "EMBED_EPOCHS = 1",
            "BLOCKS = 1",
            "MIX_PROB = 1.0",
        ],  # fmt: skip
        output_dir=tmp_path / "d",
    )
    record = m["history"][-1]
    mixer, clips = record["mixer"], record["clips"]
    # every sample mixes MIX_CLASSES = 10 classes: 0 <= H(σ) <= log 10, 1/10 <= max σ <= 1
    assert mixer["mixed_fraction"] == 1.0
    assert 0.0 <= mixer["sigma_entropy"] <= torch.log(torch.tensor(10.0)).item() + 1e-5
    assert 0.1 - 1e-6 <= mixer["sigma_max"] <= 1.0
    assert len(clips["lo"]) == len(clips["hi"]) > 0
    assert all(lo < hi for lo, hi in zip(clips["lo"], clips["hi"], strict=True))


def test_engine_sigma_means_weigh_mixed_samples_only():
    from dfqkit.engine import Engine

    engine = Engine.__new__(Engine)  # only the accumulators
    engine.loss_sums, engine.loss_counts = {}, {}
    uniform = torch.full((2, 4), 0.25)
    engine._sigma_stats({"sigma": uniform, "mixed": torch.tensor([True, True])})
    engine._sigma_stats({"sigma": torch.eye(4)[:2], "mixed": torch.tensor([False, False])})
    means = engine.pop_loss_means()
    assert means["mixer/sigma_entropy"] == pytest.approx(torch.log(torch.tensor(4.0)).item())
    assert means["mixer/sigma_max"] == pytest.approx(0.25)
    assert means["mixer/mixed_fraction"] == pytest.approx(0.5)


DRIVER = textwrap.dedent(
    """
    import sys
    import dfqkit.engine as engine

    calls = {"n": 0}
    original = engine.synthesize

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # epoch 2's second iteration
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    engine.synthesize = interrupted
    from dfqkit.train import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_ctrl_c_prints_one_line_with_the_command_to_resume(teacher_env, tmp_path):
    (tmp_path / "driver.py").write_text(DRIVER)
    out = tmp_path / "run"
    cmd = [sys.executable, str(tmp_path / "driver.py"), "--gin", RECIPE, "--output_dir", str(out)]
    for p in [*TINY, "EPOCHS = 3", "train.warmup_epochs = 1", "train.calib_epochs = 1"]:
        cmd += ["--gin_param", p]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 130, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        "dfqkit.train: interrupted; the last complete checkpoint is epoch-0001; resume with: "
        f"python -m dfqkit.train --resume --output_dir {out}"
    )
    assert "Traceback" not in proc.stderr


def test_a_tracker_that_cannot_start_is_an_error(teacher_env, tmp_path, monkeypatch):
    import accelerate.accelerator

    monkeypatch.setattr(accelerate.accelerator, "filter_trackers", lambda *a, **k: [])
    with pytest.raises(ConfigError, match="tensorboard could not start"):
        run([RECIPE], [*TINY, "EPOCHS = 1", "train.trackers = ['tensorboard']"],
            output_dir=tmp_path / "t")  # fmt: skip


def test_a_missing_optional_package_names_the_extra(monkeypatch):
    from dfqkit.export_onnx import export_model_onnx

    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now fails
    with pytest.raises(MissingDependency, match=r"pip install 'dfqkit\[onnx\]'"):
        export_model_onnx(torch.nn.Identity(), torch.zeros(1, 1), "x.onnx")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    from dfqkit.bench import plot

    with pytest.raises(MissingDependency, match=r"dfqkit\[plots\]"):
        plot([], "x.png")


def test_accelerate_launch_asking_for_more_processes_than_it_started_is_said(monkeypatch, caplog):
    monkeypatch.setattr(checks, "launched_processes", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with caplog.at_level(logging.WARNING):
        checks.check_launch()
    assert "asked for 2 processes but started 1" in caplog.text and "torchrun" in caplog.text


def test_diagnose_labels_each_run_by_its_directory():
    assert run_labels(["runs/a/seed0", "runs/b/seed0"]) == ["a/seed0", "b/seed0"]
    assert run_labels(["runs/gdfq", "runs/diversity"]) == ["gdfq", "diversity"]


def test_list_shows_a_components_own_docstring_not_an_inherited_one():
    from dfqkit.losses.base import Loss

    class Undocumented(Loss):
        def compute(self, step):
            return step.teacher_logits.sum()

    assert Entry("losses", "Undocumented", Undocumented, "x:y").summary == "(no description)"
    kd = _REGISTRY["losses"]["KDLoss"]
    assert kd.summary.startswith(kd.obj.__doc__.strip().splitlines()[0])


def test_metrics_json_keeps_only_evaluated_epochs_in_best_and_last(tmp_path):
    from dfqkit.checkpoint import TrainState
    from dfqkit.quant import QuantConfig
    from dfqkit.report import summarize

    state = TrainState()
    state.reference = {"teacher": {"top1": 99.0}, "naive": {"top1": 10.0}}
    state.history = [
        {"epoch": 1, "phase": "training", "losses": {}},  # not evaluated (eval_every = 2)
        {"epoch": 2, "phase": "training", "losses": {}, "val_top1": 50.0, "test_top1": 40.0},
        {"epoch": 3, "phase": "training", "losses": {}},
    ]
    m = summarize(state, recipe="r", seed=0, quant=QuantConfig(w_bits=4, a_bits=4),
                  resumed_from=None)  # fmt: skip
    assert m["last"] == {"epoch": 2, "test_top1": 40.0} and m["last5"]["test_top1"] == 40.0
    json.dumps(m)  # serializable


def test_a_bias_corrected_ema_frozen_before_it_settles_is_warned(caplog):
    from accelerate.state import PartialState
    from torch import nn

    from dfqkit.build import ema_inflation, warn_inflated_ranges
    from dfqkit.quant import EMAActQuantizer, QuantConfig, quantize_

    # by hand, m = 0.9 and a constant statistic 1.0: t=1: 0.1 / 0.1 = 1; t=2: (0.9 + 0.1) / 0.19
    assert ema_inflation(0.9, 1) == pytest.approx(1.0)
    assert ema_inflation(0.9, 2) == pytest.approx(1 / 0.19)
    assert ema_inflation(0.9, 400) == pytest.approx(1.0)
    PartialState()
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    for correct in (True, False):
        quant = QuantConfig(
            w_bits=4,
            a_bits=4,
            act_quantizer=functools.partial(EMAActQuantizer, bias_correction=correct),
        )
        student = quantize_(copy.deepcopy(net), quant, torch.zeros(1, 1, 4, 4))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            warn_inflated_ranges(student, naive=200, run=32)
        assert ("frozen at about 2.49e+03x" in caplog.text) is correct
        assert "calibration give them 32 updates" in caplog.text or not correct
        assert "noise batches" not in caplog.text  # 200 naive updates have settled
        assert "quantizers.EMAActQuantizer.bias_correction = False" in caplog.text or not correct
    # the fix names the quantizer actually in use (the paper's learnable clips subclass the EMA)
    from dfqkit.quant.act_learnable import LearnableClipActQuantizer

    learnable = functools.partial(LearnableClipActQuantizer, bias_correction=True)
    quant = QuantConfig(w_bits=4, a_bits=4, act_quantizer=learnable)
    student = quantize_(copy.deepcopy(net), quant, torch.zeros(1, 1, 4, 4))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        warn_inflated_ranges(student, naive=8, run=40)
    assert "quantizers.LearnableClipActQuantizer.bias_correction = False" in caplog.text


@pytest.mark.parametrize("method", ["gdfq", "diversity"])
def test_the_cpu_recipes_freeze_no_range_before_it_settles(method, caplog):
    """The Lite1 generator-family recipes calibrate with 8 noise batches and 2 x 20 iterations:
    too few for GDFQ's bias-corrected EMA (their first full run froze ranges ~1,000x too wide,
    0 % agreement), so they bind a plain EMA; their configuration must not warn."""
    import gin

    from dfqkit import config as cfg
    from dfqkit.build import warn_inflated_ranges
    from dfqkit.quant import QuantConfig, act_quantizers, quantize_

    gin.clear_config()
    try:
        cfg.parse([f"recipes/cpu/lite1_{method}_w4a8.gin"], [])
        quant = gin.get_configurable("quant.QuantConfig")()  # with the recipe's bindings
        naive = gin.query_parameter("train.naive_batches")  # the recipe's own budget
        updates = gin.query_parameter("train.calib_epochs") * gin.query_parameter(
            "%ITERS_PER_EPOCH"
        )
    finally:
        gin.clear_config()
    assert isinstance(quant, QuantConfig) and (naive, updates) == (8, 40)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten())
    quant = dataclasses.replace(quant, layer_bits=None)  # it names a Lite1 layer; net is a stand-in
    student = quantize_(net, quant, torch.zeros(1, 1, 4, 4))
    assert act_quantizers(student)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        warn_inflated_ranges(student, naive=naive, run=updates)
    assert "bias-corrected EMA" not in caplog.text


def test_the_epoch_line_names_the_phase_and_says_when_no_student_step_was_taken():
    from dfqkit.report import epoch_line

    assert epoch_line({"epoch": 1, "phase": "calibration"}, None).startswith(
        "epoch 1 [calibration: no student step yet]"
    )
    assert epoch_line({"epoch": 5, "phase": "training"}, None).startswith("epoch 5 [training]")
    # a PTQ student after its reconstruction is the result, not a student waiting for a step
    assert epoch_line({"epoch": 1, "phase": "reconstructed"}, None).startswith(
        "epoch 1 [reconstructed]"
    )
