import json

import pytest
import torch
from safetensors import safe_open

from dfqkit.export import export_safetensors, load_quantized, main
from dfqkit.rundir import load_run
from dfqkit.train import run

TINY = [
    "EPOCHS = 2",
    "ITERS_PER_EPOCH = 2",
    "BATCH_SIZE = 8",
    "train.warmup_epochs = 1",
    "train.calib_epochs = 1",
    "train.naive_batches = 2",
    "LATENT_DIM = 8",
    "generators.ConditionalGenerator.width = 16",
]


GENIE = ["SYNTH_IMAGES = 32", "SYNTH_BATCH = 16", "SYNTH_ITERS = 2", "ITERS_PER_EPOCH = 2",
         "EPOCHS = 1", "train.warmup_epochs = 1", "RECON_SAMPLES = 32", "RECON_BATCH = 8",
         "RECON_ITERS = 4"]  # fmt: skip


def _reference_logits(run_dir, images, which="best"):
    student = load_run(run_dir, which=which).student_module
    with torch.no_grad():
        return student(images)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "extra"),
    [
        ("recipes/mnist/gdfq_w4a4.gin", []),
        ("recipes/mnist/vit_diversity_w4a8.gin", ["DIM = 8", "HEADS = 2", "BLOCKS = 1"]),
        # AdaRound weights with learned step sizes, LSQ activations, 8-bit first/last layers
        ("recipes/mnist/genie_w4a4.gin", GENIE),
    ],
)
def test_export_round_trip_reproduces_the_student_exactly(teacher_env, tmp_path, recipe, extra):
    run_dir = tmp_path / "run"
    tiny = TINY if "genie" not in recipe else [p for p in TINY if p.startswith(("train.", "BATCH"))]
    run([recipe], [*tiny, *extra], output_dir=run_dir)
    out = export_safetensors(run_dir)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        codes = {k[: -len(".weight.codes")]: f.get_tensor(k) for k in keys if k.endswith(".codes")}
    assert meta["format"] == "dfqkit.quantized.v1" and "train.teacher" in meta["operative_config"]
    layers = json.loads(meta["layers"])
    assert codes and all(c.dtype == torch.int8 for c in codes.values())
    for name, c in codes.items():
        bits = layers[name]["bits"]
        assert bits == (
            8 if "genie" in recipe and name in ("features.init_block.conv", "output") else 4
        )
        assert c.min() >= -(2 ** (bits - 1)) and c.max() <= 2 ** (bits - 1) - 1
    assert any(v["kind"] == "activation" for v in layers.values())
    torch.manual_seed(0)
    images = torch.randn(6, 1, 28, 28)
    want = _reference_logits(run_dir, images)
    loaded = load_quantized(out)
    with torch.no_grad():
        got = loaded(images)
    assert torch.equal(got, want)


def test_export_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has no config.gin: not a dfqkit run" in err and "Traceback" not in err


def test_load_refuses_a_foreign_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="is not a dfqkit quantized export"):
        load_quantized(path)
