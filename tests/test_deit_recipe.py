"""The user's command, ``accelerate launch -m dfqkit.train --gin recipes/deit_w4a8.gin``, end to
end on a tiny image folder and a randomly initialised DeiT-Tiny checkpoint written here."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dfqkit.train import main

SHRINK = [
    "NUM_CLASSES = 3",
    "EPOCHS = 2",
    "ITERS_PER_EPOCH = 1",
    "BATCH_SIZE = 2",
    "train.warmup_epochs = 1",
    "train.calib_epochs = 1",
    "EMBED_EPOCHS = 1",
    "DIM = 8",
    "HEADS = 2",
    "BLOCKS = 1",
    "MIX_CLASSES = 2",
    "train.naive_batches = 1",
    "generators.ConditionalGenerator.width = 16",
]


@pytest.fixture(scope="module")
def deit_files(tmp_path_factory):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("deit")
    rng = np.random.default_rng(0)
    for cls in ("n001", "n002", "n003"):
        (root / "val" / cls).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "val" / cls / f"{i}.png")
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=3)
    save_file(model.state_dict(), root / "deit_tiny.safetensors")
    return root


@pytest.mark.slow
def test_accelerate_launch_runs_the_deit_recipe(deit_files, tmp_path):
    out = tmp_path / "run"
    params = [
        f"DATA_ROOT = '{deit_files / 'val'}'",
        f"TEACHER_WEIGHTS = '{deit_files / 'deit_tiny.safetensors'}'",
        *SHRINK,
    ]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--cpu",
        "-m",
        "dfqkit.train",
        "--gin",
        "recipes/deit_w4a8.gin",
        "--output_dir",
        str(out),
    ]
    for p in params:
        cmd += ["--gin_param", p]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "run directory:" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["w_bits"], metrics["a_bits"], metrics["epochs_done"]) == (4, 8, 2)
    operative = (out / "operative_config.gin").read_text()
    assert (
        "deit_tiny_patch16_224" in operative
        and "BNStatsLoss" not in operative.split("train.losses")[1].split("]")[0]
    )


def test_missing_data_and_weights_are_named(capsys, tmp_path):
    code = main(["--gin", "recipes/deit_w4a8.gin", "--output_dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "DATA_ROOT" in err and "TEACHER_WEIGHTS" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
