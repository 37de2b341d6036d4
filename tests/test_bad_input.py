"""Bad input, table-driven: every case fails before any training step, with exit code 2 and one
line on stderr naming the problem, and no traceback unless ``--debug``."""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dfqkit import checkpoint as ckpt
from dfqkit.engine import Engine
from dfqkit.train import main, run

TINY = [
    "EPOCHS = 2",
    "ITERS_PER_EPOCH = 2",
    "BATCH_SIZE = 8",
    "train.warmup_epochs = 1",
    "train.calib_epochs = 1",
]
# only for recipes with GDFQ's generator (a binding nothing reads is itself refused)
TINY_GENERATOR = ["LATENT_DIM = 8", "generators.ConditionalGenerator.width = 16"]
DEIT_SHRINK = [
    "NUM_CLASSES = 3",
    "BATCH_SIZE = 2",
    "EMBED_EPOCHS = 1",
    "DIM = 8",
    "HEADS = 2",
    "BLOCKS = 1",
    "MIX_CLASSES = 2",
    "generators.ConditionalGenerator.width = 16",
]
R = "recipes/mnist/gdfq_w4a4.gin"
VIT = "recipes/mnist/vit_diversity_w4a8.gin"
DEIT = "recipes/deit_w4a8.gin"
SIDE_EFFECT = "PWNED"


class _Evil:
    """A pickle that would run code when loaded (it creates a file)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture(scope="module")
def world(tmp_path_factory, zoo_teacher):
    """Files the cases point at: a finished tiny run (copied and damaged per case), an image
    folder, an empty folder, a plain file, teacher weights good, foreign and malicious."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("bad")
    old = os.environ.get("DFQKIT_CACHE")
    os.environ["DFQKIT_CACHE"] = str(zoo_teacher)
    run([R], [*TINY, *TINY_GENERATOR], output_dir=root / "good")
    (root / "imports_nothing.gin").write_text(f"import no_such_plugin_module\ninclude '{R}'\n")
    import gin

    gin.clear_config(clear_constants=True)
    rng = np.random.default_rng(0)
    for cls in ("a", "b", "c"):
        (root / "images" / cls).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            root / "images" / cls / "0.png"
        )
    (root / "empty").mkdir()
    (root / "a_file").write_text("not a directory\n")
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=3)
    save_file(deit.state_dict(), root / "deit.safetensors")
    save_file({"conv1.weight": torch.zeros(16, 1, 3, 3)}, root / "resnet8.safetensors")
    torch.save({"model": _Evil(root / SIDE_EFFECT)}, root / "evil.pth")
    yield root
    if old is None:
        os.environ.pop("DFQKIT_CACHE", None)
    else:
        os.environ["DFQKIT_CACHE"] = old


def _damaged_run(world, name, damage):
    """A copy of the finished run whose newest checkpoint ``damage(path)`` has changed."""
    run_dir = world / "runs" / name
    shutil.copytree(world / "good", run_dir)
    (run_dir / "metrics.json").unlink()
    damage(ckpt.latest_checkpoint(run_dir))
    return run_dir


WIDER = "generators.ConditionalGenerator.width = 32"


def _append(path, line):
    path.write_text(path.read_text() + line + "\n")


def _truncate(path, keep=300):
    path.write_bytes(path.read_bytes()[:keep])


def _deit(world, *params, weights="deit.safetensors", data="images"):
    return [
        f"DATA_ROOT = '{world / data}'",
        f"TEACHER_WEIGHTS = '{world / weights}'",
        *DEIT_SHRINK,
        *params,
    ]


# name: (recipe, bindings (a function of the world), expected substrings, output / resume)
CASES = {
    "unknown component": (
        R,
        ["train.mixer = @mixers.MixUp()"],
        ["'@mixers.MixUp()'", "Did you mean 'mixers.Mixup'"],
    ),
    "misspelled train binding": (R, ["train.epochz = 3"], ["'train'", "'epochz'", "'epochs'"]),
    "misspelled component binding": (
        R,
        ["mixers.Mixup.alpah = 0.2"],
        ["'mixers.Mixup'", "alpah", "Did you mean 'alpha'"],
    ),
    "misspelled macro": (
        "recipes/mnist/diversity_w4a3.gin",
        ["HAEDS = 0"],
        ["macro HAEDS is set but nothing in the configuration reads it", "'HEADS'"],
    ),
    "entropy floor on a sigma that is not learned": (
        "recipes/ablations/diversity_sigma_entropy_floor_w4a3.gin",
        ["HEADS = 0"],
        ["SigmaEntropyFloor in train.losses", "learns none", "heads > 0"],
    ),
    "binding of a part the run does not have": (
        R,
        ["mixers.Mixup.alpha = 0.3"],
        ["binding mixers.Mixup.alpha is read by nothing", "'mixers.NoMixer'"],
    ),
    "a component class where an instance belongs": (
        R,
        ["train.mixer = @mixers.Mixup"],
        ["train.mixer is @mixers.Mixup", "write @mixers.Mixup() (with parentheses)"],
    ),
    "ranges that would never be observed": (
        R,
        ["train.calib_epochs = 0"],
        ["train.calib_epochs = 0", "never observe", "train.calibration = 'noise'"],
    ),
    "unmixed calibration without a mixer": (
        R,
        ["train.calibration = 'generator_unmixed'"],
        ["train.calibration = 'generator_unmixed'", "mixes nothing", "use 'generator'"],
    ),
    "unmixed calibration that would also observe the mixed batches": (
        R,
        [
            "train.mixer = @mixers.Mixup()",
            "train.calibration = 'generator_unmixed'",
            "train.observe_in_both_steps = True",
        ],
        ["train.observe_in_both_steps = True", "'generator_unmixed'", "set one of them"],
    ),
    "misspelled calibration source": (
        R,
        ["train.calibration = 'generator_unmix'"],
        [
            "train.calibration must be one of",
            "'generator_unmix'",
            "Did you mean 'generator_unmixed'",
        ],
    ),
    "gin import of a missing module": (
        lambda w: str(w / "imports_nothing.gin"),
        [],
        ["gin `import no_such_plugin_module` failed", "importable"],
    ),
    "unknown gin file": ("recipes/nope.gin", [], ["gin file 'recipes/nope.gin' not found"]),
    "gin syntax error": (R, ["W_BITS = = 3"], ["bad config", "Unable to parse"]),
    "wrong type: epochs": (R, ["EPOCHS = 'ten'"], ["train.epochs", "'ten'"]),
    "wrong type: batch size": (R, ["BATCH_SIZE = 8.5"], ["train.batch_size", "8.5"]),
    "wrong type: bits": (R, ["W_BITS = 'four'"], ["w_bits", "'four'", "2..16"]),
    "wrong type: deep in a component": (
        R,
        ["generators.ConditionalGenerator.width = 'wide'"],
        ["ConditionalGenerator", "str"],
    ),
    "wrong type: loss weight": (R, ["losses.BNStatsLoss.weight = 'heavy'"], ["BNStatsLoss.weight"]),
    "wrong type: seed": (R, ["SEED = 'abc'"], ["SEED", "'abc'"]),
    "wrong type: deterministic": (R, ["train.deterministic = 'yes'"], ["train.deterministic"]),
    "weight bits out of range": (R, ["W_BITS = 1"], ["w_bits must be in 2..16, got 1"]),
    "activation bits out of range": (R, ["A_BITS = 33"], ["a_bits must be in 2..16, got 33"]),
    "batch size 0": (R, ["BATCH_SIZE = 0"], ["train.batch_size must be an integer >= 1, got 0"]),
    "eval_every 0": (R, ["train.eval_every = 0"], ["train.eval_every", "got 0"]),
    "early stopping patience 0": (R, ["train.early_stopping_patience = 0"], ["patience", "0"]),
    "non-finite limit 0": (R, ["train.max_nonfinite_in_a_row = 0"], ["max_nonfinite_in_a_row"]),
    "latent size 0": (R, ["LATENT_DIM = 0"], ["latent_dim must be >= 1, got 0"]),
    "negative learning rate": (R, ["STUDENT_LR = -1.0"], ["learning rate", "-1.0"]),
    "unknown mixed precision": (R, ["train.mixed_precision = 'fp8'"], ["'fp8'", "'bf16'"]),
    "unknown calibration": (R, ["train.calibration = 'foo'"], ["train.calibration", "'foo'"]),
    "unknown generator schedule": (R, ["train.generator_lr_schedule = 'linear'"], ["'linear'"]),
    "reconstruction without AdaRound weights": (
        "recipes/mnist/genie_w4a4.gin",
        ["train.warmup_epochs = 2", "QuantConfig.weight_quantizer = @MinMaxWeightQuantizer"],
        ["train.reconstruction", "AdaRoundWeightQuantizer", "MinMaxWeightQuantizer"],
    ),
    "reconstruction after a training student": (
        "recipes/mnist/genie_w4a4.gin",
        ["train.warmup_epochs = 0"],
        ["train.reconstruction", "warmup_epochs >= train.epochs=2", "got 0"],
    ),
    "reconstruction batch larger than its samples": (
        "recipes/mnist/genie_w4a4.gin",
        ["train.warmup_epochs = 2", "RECON_BATCH = 64", "RECON_SAMPLES = 32"],
        ["BlockReconstruction.batch_size=64", "num_samples=32"],
    ),
    "unknown quantizer placement": (R, ["quant.QuantConfig.policy = 'all'"], ["policy", "'all'"]),
    "unknown tracker": (R, ["train.trackers = ['nope']"], ["unknown tracker", "'nope'"]),
    "bad mixer parameter": (
        R,
        ["train.mixer = @mixers.Mixup()", "mixers.Mixup.alpha = -1.0"],
        ["Mixup.alpha must be > 0, got -1.0"],
    ),
    "no loss": (R, ["train.losses = []"], ["train.losses is empty"]),
    "no student loss": (R, ["train.losses = [@losses.BNStatsLoss()]"], ["no student-side loss"]),
    "classes the teacher does not have": (R, ["NUM_CLASSES = 100"], ["num_classes=100"]),
    "channels the teacher does not take": (R, ["CHANNELS = 3"], ["in_channels=3"]),
    "generator image size vs data": (VIT, ["IMAGE_SIZE = 32"], ["1×32×32", "1×28×28"]),
    "BNS loss on a BN-free teacher": (
        VIT,
        ["train.losses = [@losses.BNStatsLoss(), @student/losses.KDLoss()]"],
        ["BNStatsLoss", "no BatchNorm"],
    ),
    "BN-matching synthesis on a BN-free teacher": (
        "recipes/mnist/zeroq_w4a4.gin",
        [
            "include 'gin/models/mnist_vit.gin'",
            "include 'gin/quant/vit.gin'",  # a ViT quantizes (what fails is the synthesis)
            "EPOCHS = 1",
            "SYNTH_IMAGES = 16",
            "SYNTH_BATCH = 8",
            "SYNTH_ITERS = 2",
        ],  # fmt: skip
        ["ZeroQBNSLoss (in generators.SyntheticSet.losses)", "no BatchNorm", "PSAQ-ViT"],
    ),
    "mixer stage the generator cannot accept": (
        "recipes/mnist/vit_psaq_w4a8.gin",
        ["train.mixer = @mixers.EmbeddingMixup()"],
        ["stage 'cond'", "PixelBank", "['image']"],
    ),
    "missing REQUIRED macros": (DEIT, [], ["DATA_ROOT", "TEACHER_WEIGHTS", "--gin_param"]),
    "missing data folder": (
        DEIT,
        lambda w: _deit(w, data="no_such_folder"),
        ["no_such_folder", "is not a directory"],
    ),
    "empty image folder": (DEIT, lambda w: _deit(w, data="empty"), ["no class sub-directories"]),
    "image size the teacher cannot take": (
        DEIT,
        lambda w: _deit(
            w,
            "train.data = @data.imagenet_folder()",
            f"data.imagenet_folder.root = '{w / 'images'}'",
            "data.imagenet_folder.image_size = 160",
            "IMAGE_SIZE = 160",
        ),
        ["the teacher cannot take 3×160×160 images"],
    ),
    "missing teacher weights": (
        DEIT,
        lambda w: _deit(w, weights="none.safetensors"),
        ["checkpoint not found", "none.safetensors"],
    ),
    "teacher weights of another architecture": (
        DEIT,
        lambda w: _deit(w, weights="resnet8.safetensors"),
        ["does not fit model VisionTransformer", "missing keys"],
    ),
    "teacher weights that would run code": (
        DEIT,
        lambda w: _deit(w, weights="evil.pth"),
        ["evil.pth", "refused, since loading it could run code"],
    ),
    "output directory is a file": (R, [], ["is not a directory"], "a_file"),
    "existing run without --resume": (R, [], ["already holds a run", "--resume"], "good"),
    "corrupt checkpoint": (
        R,
        ["EPOCHS = 3"],
        ["model.safetensors", "is corrupt or truncated"],
        ("resume", lambda c: (c / "model.safetensors").write_bytes(b"garbage" * 10)),
    ),
    "truncated checkpoint": (
        R,
        ["EPOCHS = 3"],
        ["model_1.safetensors", "is corrupt or truncated"],
        ("resume", lambda c: _truncate(c / "model_1.safetensors")),
    ),
    "truncated optimizer state": (
        R,
        ["EPOCHS = 3"],
        ["optimizer.bin", "is corrupt or truncated"],
        ("resume", lambda c: _truncate(c / "optimizer.bin")),
    ),
    "checkpoint of another architecture": (
        R,
        ["EPOCHS = 3", WIDER],
        ["does not fit this run", "size mismatch", "config.gin"],
        ("resume", lambda c: _append(c.parent.parent / "config.gin", WIDER)),
    ),
    "resume with another configuration": (
        R,
        ["EPOCHS = 3", WIDER],
        ["differs from the run's own config.gin", "ConditionalGenerator.width: 16 -> 32"],
        ("resume", lambda c: None),
    ),
    "checkpoint pickle that would run code": (
        R,
        ["EPOCHS = 3"],
        ["custom_checkpoint_0.pkl", "refused, since loading it could run code", "posix.system"],
        (
            "resume",
            lambda c: torch.save({"x": _Evil(c.parent.parent / SIDE_EFFECT)}, c / ckpt_pkl(c)),
        ),
    ),
}


def ckpt_pkl(c):
    return sorted(p.name for p in c.glob("custom_checkpoint_*.pkl"))[0]


def test_the_table_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_fails_before_training_with_one_line(name, world, capsys, monkeypatch):
    recipe, params, expected, *where = CASES[name]
    params = params(world) if callable(params) else params
    recipe = recipe(world) if callable(recipe) else recipe
    if recipe != DEIT:
        tiny = [*TINY, *TINY_GENERATOR] if recipe in (R, VIT) or "diversity" in recipe else TINY
        params = [*tiny, *params]
    argv = ["--gin", recipe]
    for p in params:
        argv += ["--gin_param", p]
    resume = False
    if where and isinstance(where[0], tuple):
        out = _damaged_run(world, name.replace(" ", "_"), where[0][1])
        resume = True
    elif where:
        out = world / where[0]
    else:
        out = world / "runs" / name.replace(" ", "_")
    before = sorted(p.name for p in (out / "checkpoints").glob("*")) if out.is_dir() else None

    def no_training(*_a, **_k):
        raise AssertionError(f"{name}: a training step ran")

    monkeypatch.setattr(Engine, "iteration", no_training)
    code = main([*argv, "--output_dir", str(out), *(["--resume"] if resume else [])])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    ours = [ln for ln in err.splitlines() if ln.startswith("dfqkit.train:")]
    assert len(ours) == 1, err
    assert ours[0].startswith("dfqkit.train: error: ")
    for text in expected:
        assert text in ours[0], (text, ours[0])
    if before is not None and out.is_dir():  # nothing written into an existing run
        assert sorted(p.name for p in (out / "checkpoints").glob("*")) == before
    assert not (world / SIDE_EFFECT).exists() and not (out / SIDE_EFFECT).exists()


@pytest.mark.slow
def test_debug_shows_the_traceback(world):
    with pytest.raises(ValueError, match="w_bits must be in 2..16"):
        main(["--gin", R, "--gin_param", "W_BITS = 1", "--output_dir", str(world / "d"), "--debug"])
