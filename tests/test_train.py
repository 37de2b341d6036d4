"""The real trainer on the offline testbed, shrunk to a few iterations."""

import json

import pytest
import torch

from dfqkit import checkpoint as ckpt
from dfqkit.config import ConfigError
from dfqkit.train import main, run

TINY = [
    "EPOCHS = 2",
    "ITERS_PER_EPOCH = 2",
    "BATCH_SIZE = 8",
    "train.warmup_epochs = 1",
    "train.calib_epochs = 1",
    "LATENT_DIM = 8",
    "generators.ConditionalGenerator.width = 16",
]
RECIPE = "recipes/mnist/gdfq_w4a4.gin"
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
# for recipes without GDFQ's generator (a binding nothing reads is refused)
NO_GENERATOR = [p for p in TINY if not p.startswith(("LATENT_DIM", "generators."))]


@pytest.mark.slow
def test_run_writes_the_run_directory_and_metrics(teacher_env, tmp_path):
    out = tmp_path / "run"
    metrics = run([RECIPE], TINY, output_dir=out)
    saved = json.loads((out / "metrics.json").read_text())
    for key in (
        "recipe",
        "seed",
        "w_bits",
        "a_bits",
        "resumed_from_epoch",
        "ms_per_iter",
        "time_s",
    ):
        assert key in saved
    assert saved["recipe"] == RECIPE and saved["w_bits"] == 4 and saved["a_bits"] == 4
    assert saved["resumed_from_epoch"] is None
    zoo = json.loads((teacher_env / "zoo" / "mnist_resnet8.json").read_text())
    assert saved["teacher"]["test_top1"] == pytest.approx(zoo["test_top1"])  # same test split
    for key in ("naive", "last", "last5"):
        assert 0 <= saved[key]["test_top1"] <= 100
    assert saved["best"]["epoch"] in (1, 2) and 0 <= saved["best"]["val_top1"] <= 100
    assert [h["epoch"] for h in saved["history"]] == [1, 2]
    best = max(saved["history"], key=lambda h: h["val_top1"])
    assert saved["best"]["test_top1"] == best["test_top1"]
    assert saved["iterations"] == 4 and saved["ms_per_iter"] > 0
    # epoch 1 is warm-up/calibration, epoch 2 trains the student
    phases = saved["phase_seconds"]
    assert set(phases) == {"synthesis", "references", "calibration", "training", "evaluation"}
    assert phases["calibration"] + phases["training"] == pytest.approx(
        saved["ms_per_iter"] * saved["iterations"] / 1000
    )
    assert saved["float_layers"] == []
    assert metrics["output_dir"] == str(out)
    assert (out / "config.gin").read_text().count("include 'gin/base.gin'") == 1
    assert "train.epochs" in (out / "operative_config.gin").read_text()
    assert (out / "samples" / "epoch_0002.png").is_file()
    assert ckpt.latest_checkpoint(out).name == "epoch-0002"


@pytest.mark.slow
def test_resume_continues_and_matches_an_uninterrupted_run(teacher_env, tmp_path):
    full = run([RECIPE], [*TINY, "EPOCHS = 3"], output_dir=tmp_path / "full")
    run([RECIPE], TINY, output_dir=tmp_path / "cut")  # "killed" after epoch 2
    (tmp_path / "cut" / "metrics.json").unlink()
    # a half-written checkpoint from the kill is never loaded
    (tmp_path / "cut" / "checkpoints" / ".tmp-epoch-0003").mkdir()
    resumed = run([RECIPE], [*TINY, "EPOCHS = 3"], output_dir=tmp_path / "cut", resume=True)
    assert resumed["resumed_from_epoch"] == 2
    assert resumed["history"] == full["history"]  # bit-identical on CPU
    assert resumed["iterations"] == full["iterations"] == 6


@pytest.mark.slow
def test_existing_run_is_not_overwritten_without_resume(teacher_env, tmp_path):
    run([RECIPE], [*TINY, "EPOCHS = 1"], output_dir=tmp_path / "r")
    with pytest.raises(ConfigError, match="--resume"):
        run([RECIPE], [*TINY, "EPOCHS = 1"], output_dir=tmp_path / "r")


@pytest.mark.slow
def test_realdata_reference_and_bf16_autocast_run(teacher_env, tmp_path):
    m = run(
        ["recipes/mnist/realdata_w4a4.gin"],
        [*NO_GENERATOR, "EPOCHS = 1", "train.warmup_epochs = 0"],
        output_dir=tmp_path / "real",
    )
    assert m["iterations"] == 2
    import gin

    gin.clear_config()
    m = run(
        [RECIPE],
        [*TINY, "EPOCHS = 1", "train.warmup_epochs = 0", "train.mixed_precision = 'bf16'"],
        output_dir=tmp_path / "bf16",
    )
    assert 0 <= m["last"]["test_top1"] <= 100


def test_cli_errors_are_one_line_without_traceback(teacher_env, capsys, tmp_path):
    code = main(["--gin", RECIPE, "--gin_param", "W_BITS = 1", "--output_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "w_bits must be in 2..16, got 1 (in QuantConfig)" in err
    (tmp_path / "file").write_text("x")
    code = main(["--gin", RECIPE, "--output_dir", str(tmp_path / "file")])
    assert code == 2 and "is not a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_quickstart_runs_the_papers_method_and_names_the_gdfq_comparison(
    teacher_env, capsys, tmp_path
):
    params = [*TINY, "DIM = 8", "EMBED_EPOCHS = 1", "BLOCKS = 1"]
    args = ["--gin", "recipes/quickstart.gin", "--output_dir", str(tmp_path / "q")]
    assert main([*args, *(x for p in params for x in ("--gin_param", p))]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2].startswith("test top-1: teacher ")
    assert out[-1].endswith(
        "python -m dfqkit.bench accuracy --gin recipes/quickstart.gin recipes/quickstart_gdfq.gin "
        "--seeds 0 --out runs/quickstart_vs_gdfq"
    )
    metrics = json.loads((tmp_path / "q" / "metrics.json").read_text())
    assert metrics["note"] == out[-1]
    assert "MultiLayerAttentionMixer" in (tmp_path / "q" / "config.gin").read_text()
    assert (REPO / "recipes/quickstart_gdfq.gin").exists()


def test_a_note_must_be_one_line(teacher_env, tmp_path):
    with pytest.raises(ConfigError, match="train.note must be a one-line string"):
        run([RECIPE], [*TINY, "train.note = 'a\\nb'"], output_dir=tmp_path / "x")


def test_checkpoint_selection_ignores_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in (("epoch-0001", True), ("epoch-0002", False), (".tmp-epoch-0003", True)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / ckpt.COMPLETE).write_text("x")
    assert ckpt.latest_checkpoint(tmp_path).name == "epoch-0001"
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None


def test_train_state_round_trip():
    s = ckpt.TrainState()
    s.epochs_done, s.history, s.best = 3, [{"epoch": 1}], {"epoch": 1}
    t = ckpt.TrainState()
    t.load_state_dict(s.state_dict())
    assert vars(t) == vars(s)
    torch.save(s.state_dict(), "/dev/null")  # plain values only: safe for weights_only loads


@pytest.mark.slow
def test_early_stopping_stops_after_patience_evaluations_without_improvement(teacher_env, tmp_path):
    # a student that cannot change (lr 0) has the same val accuracy every epoch after calibration
    params = [
        *TINY,
        "EPOCHS = 5",
        "student/torch.optim.SGD.lr = 0.0",
        "train.early_stopping_patience = 2",
    ]
    m = run([RECIPE], params, output_dir=tmp_path / "es")
    # epoch 1 calibrates (no student step), so it is not a candidate for best: best is epoch 2,
    # and epochs 3 and 4 without improvement exhaust the patience
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3, 4]
    assert m["history"][0]["phase"] == "calibration"
    assert m["epochs_done"] == 4 and m["best"]["epoch"] == 2


@pytest.mark.slow
def test_diversity_recipe_runs_end_to_end_and_learns_clip_bounds(teacher_env, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "div"
    params = [*TINY, "DIM = 8", "HEADS = 2", "BLOCKS = 1", "EMBED_EPOCHS = 1"]
    metrics = run(["recipes/mnist/diversity_w4a4.gin"], params, output_dir=out)
    assert metrics["epochs_done"] == 2 and 0.0 <= metrics["last"]["test_top1"] <= 100.0

    def bounds(epoch):
        for f in sorted((out / "checkpoints" / f"epoch-{epoch:04d}").glob("model*.safetensors")):
            state = load_file(f)
            his = {k: v for k, v in state.items() if k.endswith(".hi")}
            if his:
                return his
        raise AssertionError("no activation clip bounds in the checkpoint")

    calibrated, learned = bounds(1), bounds(2)  # epoch 1 observes, epoch 2 trains the student
    assert calibrated.keys() == learned.keys() and len(calibrated) == 7
    assert any(not torch.equal(calibrated[k], learned[k]) for k in calibrated)
    operative = (out / "operative_config.gin").read_text()
    assert "MultiLayerAttentionMixer" in operative and "SimLoss2" in operative


@pytest.mark.slow
def test_vit_teacher_runs_without_bns_and_refuses_it(teacher_env, tmp_path, capsys):
    params = [*TINY, "DIM = 8", "HEADS = 2", "BLOCKS = 1", "EMBED_EPOCHS = 1"]
    metrics = run(["recipes/mnist/vit_diversity_w4a8.gin"], params, output_dir=tmp_path / "v")
    assert metrics["epochs_done"] == 2 and metrics["w_bits"] == 4 and metrics["a_bits"] == 8
    # GDFQ's BNS loss on the BN-free ViT teacher: one line before any training step
    code = main(
        [
            "--gin",
            "recipes/mnist/gdfq_w4a4.gin",
            "--gin",
            "gin/models/mnist_vit.gin",
            "--output_dir",
            str(tmp_path / "bns"),
            *sum((["--gin_param", p] for p in TINY), []),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "BNStatsLoss matches batch-norm statistics" in err
    assert "no BatchNorm layer" in err and "Traceback" not in err
    assert not (tmp_path / "bns" / "checkpoints").exists()


@pytest.mark.slow
def test_psaq_vit_is_ptq_calibrated_on_the_final_images(teacher_env, tmp_path):
    params = ["EPOCHS = 3", "ITERS_PER_EPOCH = 2", "BATCH_SIZE = 4", "train.naive_batches = 2"]
    out = tmp_path / "psaq"
    metrics = run(["recipes/mnist/vit_psaq_w4a8.gin"], params, output_dir=out)
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]  # every epoch logs its losses
    assert [h["epoch"] for h in history if "val_top1" in h] == [3]  # evaluated once ranges exist
    # PTQ: the student's float weights never moved (no student step)
    from safetensors.torch import load_file

    from dfqkit.models.mnist_vit import mnist_vit

    teacher = mnist_vit().state_dict()
    student = {}
    for f in (out / "checkpoints" / "epoch-0003").glob("model*.safetensors"):
        state = load_file(f)
        if "head.weight" in state:
            student = state
    assert student and all(torch.equal(student[k], teacher[k]) for k in teacher)


def test_final_calibration_refuses_student_steps_before_it(teacher_env, tmp_path):
    with pytest.raises(ConfigError, match="set train.warmup_epochs >= 2"):
        run(
            ["recipes/mnist/vit_psaq_w4a8.gin"],
            ["EPOCHS = 3", "train.warmup_epochs = 1"],
            output_dir=tmp_path / "x",
        )


@pytest.mark.parametrize("value", [-0.1, 1.5, True, "0.1"])
def test_constant_images_out_of_range_is_refused_naming_the_binding(teacher_env, tmp_path, value):
    with pytest.raises(ConfigError, match=r"train.constant_images must be a number in \[0, 1\]"):
        run([RECIPE], [*TINY, f"train.constant_images = {value!r}"], output_dir=tmp_path / "x")
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_cosine_schedule():
    from dfqkit.run import Schedule

    s = Schedule(epochs=5, iters_per_epoch=2, batch_size=1, warmup_epochs=0, eval_every=1,
                 early_stopping_patience=None, lr_milestones=(), lr_gamma=0.1,
                 generator_lr_schedule="cosine", generator_lr_warmup_iters=2, naive_batches=1,
                 max_nonfinite_in_a_row=1, checkpoint_keep=1, seed=0)  # fmt: skip
    assert s.cosine(0) == 0.5 and s.cosine(1) == 1.0
    assert s.cosine(2) == 1.0 and s.cosine(6) == pytest.approx(0.5)
    assert s.cosine(10) == pytest.approx(0.0)


ATTENTION_TINY = [
    "mixers.MultiLayerAttentionMixer.dim = 8",
    "mixers.MultiLayerAttentionMixer.heads = 2",
    "mixers.MultiLayerAttentionMixer.flow_heads = 2",
]


@pytest.mark.slow
@pytest.mark.parametrize("mixer", ["none", "mixup", "embedding", "attention"])
def test_each_mixer_is_one_binding(teacher_env, tmp_path, mixer):
    recipe = f"recipes/ablations/mixers_{mixer}_w3a3.gin"
    metrics = run(
        [recipe],
        [*TINY, *(ATTENTION_TINY if mixer == "attention" else [])],
        output_dir=tmp_path / mixer,
    )
    assert metrics["epochs_done"] == 2
    lines = [line for line in open(recipe).read().splitlines() if line and not line.startswith("#")]
    assert lines == ["include 'recipes/mnist/gdfq_w3a3.gin'", lines[1]]
    assert lines[1].startswith("train.mixer = @mixers.")


@pytest.mark.slow
@pytest.mark.parametrize(
    "method",
    [
        "qimera",
        "qimera_plugin",
        "gdfq_plugin",
        "adasg",
        "adadfq",
        "ait",
        "mixup",
        "image_mixup",
        "arc_ait",
    ],  # fmt: skip
)
def test_offline_method_recipes_run(teacher_env, tmp_path, method):
    # every binding must be read: shrink the generator this method builds
    generator = {"qimera": "QimeraGenerator", "qimera_plugin": "QimeraGenerator",
                 "arc_ait": "ARCGenerator"}.get(method, "ConditionalGenerator")  # fmt: skip
    params = [p for p in TINY if not p.startswith(("LATENT_DIM", "generators."))]
    params.append(f"generators.{generator}.width = 16")
    metrics = run([f"recipes/mnist/{method}_w4a4.gin"], params, output_dir=tmp_path / method)
    assert metrics["epochs_done"] == 2
    assert 0.0 <= metrics["last"]["test_top1"] <= 100.0


@pytest.mark.slow
def test_trackers_log_scalars_samples_and_histograms(teacher_env, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    run([RECIPE], [*TINY, "train.trackers = ['tensorboard']"], output_dir=out)
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "eval/val_top1" in tags["scalars"] and "loss/gen/SoftTargetCE" in tags["scalars"]
    assert "samples" in tags["images"]
    assert any(t.startswith("teacher_activations/") for t in tags["histograms"])
    assert [e.step for e in acc.Scalars("eval/val_top1")] == [1, 2]


def test_unknown_tracker_is_named(teacher_env, tmp_path):
    with pytest.raises(ConfigError, match="unknown tracker"):
        run([RECIPE], [*TINY, "train.trackers = ['tensorbored']"], output_dir=tmp_path / "x")


@pytest.mark.slow
@pytest.mark.parametrize(
    "ablation",
    sorted(p.stem for p in __import__("pathlib").Path("recipes/ablations").glob("diversity_*.gin")),
)
def test_every_diversity_ablation_builds_and_runs(teacher_env, tmp_path, ablation):
    params = [*TINY, "DIM = 8", "EMBED_EPOCHS = 1", "BLOCKS = 1"]
    metrics = run([f"recipes/ablations/{ablation}.gin"], params, output_dir=tmp_path / "a")
    assert metrics["epochs_done"] == 2


@pytest.mark.slow
def test_same_seed_same_metrics_and_the_deterministic_switch(teacher_env, tmp_path):
    a = run([RECIPE], TINY, output_dir=tmp_path / "a")
    b = run([RECIPE], [*TINY, "train.deterministic = True"], output_dir=tmp_path / "b")
    assert torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    c = run([RECIPE], [*TINY, "SEED = 1"], output_dir=tmp_path / "c")
    assert a["history"] == b["history"]  # bit-identical floats
    assert a["history"] != c["history"]  # the seed does reach the run


SYNTH_TINY = ["SYNTH_IMAGES = 16", "SYNTH_BATCH = 8", "SYNTH_ITERS = 2", "train.naive_batches = 2"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["zeroq", "dsg", "genie_d"])
def test_ptq_on_a_cached_synthetic_set(teacher_env, tmp_path, method):
    params = [*SYNTH_TINY, "BATCH_SIZE = 8", "ITERS_PER_EPOCH = 2", "train.trackers = None"]
    m = run([f"recipes/mnist/{method}_w4a4.gin"], params, output_dir=tmp_path / "zq")
    assert m["epochs_done"] == 1 and m["iterations"] == 2
    assert 0.0 <= m["last"]["test_top1"] <= 100.0
    cached = list((teacher_env / "synthetic").glob("*/batch_*.safetensors"))
    assert len(cached) >= 2
    # the checkpoint holds the sampling state, not the images
    ckpt_dir = ckpt.latest_checkpoint(tmp_path / "zq")
    assert sum(f.stat().st_size for f in ckpt_dir.rglob("*")) < 2_000_000


@pytest.mark.slow
@pytest.mark.parametrize("method", ["intraq", "hast"])
def test_two_stage_fine_tuning_recipes_run(teacher_env, tmp_path, method):
    params = [p for p in TINY if not p.startswith(("LATENT_DIM", "generators."))]
    m = run([f"recipes/mnist/{method}_w4a4.gin"], [*params, *SYNTH_TINY], output_dir=tmp_path / "r")
    assert m["epochs_done"] == 2 and 0.0 <= m["last"]["test_top1"] <= 100.0


@pytest.mark.slow
def test_noise_calibration_starts_from_the_naive_reference(teacher_env, tmp_path):
    """``train.calibration = 'noise'``: the student never observes, so after the warm-up (no
    student step yet) it is the naive reference exactly: same weights, same ranges, same test
    predictions; calibrated on the generator it is not."""
    noise = run([RECIPE], [*TINY, "train.calibration = 'noise'"], output_dir=tmp_path / "n")
    calibrated = noise["history"][0]
    assert calibrated["phase"] == "calibration"
    assert calibrated["test_top1"] == noise["naive"]["test_top1"]
    assert calibrated["test_agree"] == noise["naive"]["test_agree"]
    gen = run([RECIPE], TINY, output_dir=tmp_path / "g")
    assert gen["naive"] == noise["naive"]
    assert gen["history"][0]["test_agree"] != calibrated["test_agree"]
