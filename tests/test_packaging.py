"""A non-editable install (a built wheel) ships gin/ and recipes/ and runs a recipe from any
directory, without the source tree."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_in_a_fresh_environment_runs_a_recipe_from_another_directory(zoo_teacher, tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(wheels)],
        check=True,
        timeout=600,
    )
    (wheel,) = wheels.glob("dfqkit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dfqkit/_shipped/gin/base.gin" in names
    assert "dfqkit/_shipped/recipes/mnist/gdfq_w4a4.gin" in names
    # a fresh virtual environment: dfqkit from the wheel, its dependencies from this one
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "DFQKIT_CACHE": str(zoo_teacher), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run(
        [python, "-c", "import dfqkit.config as c; print(c.REPO_ROOT)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert where.startswith(str(venv)) and where.endswith("dfqkit/_shipped")
    cmd = [python, "-m", "dfqkit", "train", "--gin", "recipes/mnist/gdfq_w4a4.gin",
           "--output_dir", "run"]  # fmt: skip
    for p in ["EPOCHS = 1", "ITERS_PER_EPOCH = 1", "BATCH_SIZE = 4", "train.warmup_epochs = 0",
              "train.calib_epochs = 1", "train.naive_batches = 1", "LATENT_DIM = 8",
              "generators.ConditionalGenerator.width = 8", "train.trackers = None"]:  # fmt: skip
        cmd += ["--gin_param", p]
    proc = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((elsewhere / "run" / "metrics.json").read_text())
    assert metrics["recipe"] == "recipes/mnist/gdfq_w4a4.gin" and metrics["epochs_done"] == 1
    # dfqkit.quantize finds its method fragments in the installed package too
    check = "from dfqkit.api import _method_file; print(_method_file('gdfq'))"
    out = subprocess.run([python, "-c", check], cwd=elsewhere, env=env, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert out.strip() == "gin/methods/gdfq.gin"
