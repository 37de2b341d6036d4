"""Two CPU processes (gloo) through ``torchrun``: the documented multi-process CPU command.

(``accelerate launch --num_processes 2 --cpu`` starts a single process in Accelerate 1.x; on
CPU, ``torchrun`` is what forms a gloo process group that Accelerate then uses.)
"""

import json
import os
import subprocess
import sys

import pytest

PARAMS = [
    "EPOCHS = 2",
    "ITERS_PER_EPOCH = 2",
    "BATCH_SIZE = 8",
    "train.warmup_epochs = 1",
    "train.calib_epochs = 1",
    "train.naive_batches = 2",
    "DIM = 8",
    "HEADS = 2",
    "BLOCKS = 1",
    "EMBED_EPOCHS = 1",
    "train.trackers = None",
]


@pytest.mark.slow
def test_two_processes_end_identical_and_sample_differently(teacher_env, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517", "-m", "dfqkit.train",
           "--gin", "recipes/mnist/diversity_w4a4.gin", "--output_dir", str(out)]  # fmt: skip
    for p in PARAMS:
        cmd += ["--gin_param", p]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    report = metrics["processes"]
    assert report["count"] == 2, report
    assert report["identical_student"]  # weights, learnable clips and ranges agree bitwise
    a, b = report["latent_sums"]
    assert a != b  # each rank drew its own latents
    # only the main process writes: one metrics file, one sample grid per evaluated epoch
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "epoch_0001.png",
        "epoch_0002.png",
    ]
    assert done.stdout.count("run directory:") == 1


@pytest.mark.slow
def test_two_processes_split_the_synthesis_and_share_the_cached_set(teacher_env, tmp_path):
    out = tmp_path / "zq"
    cache = tmp_path / "synthetic"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29518", "-m", "dfqkit.train",
           "--gin", "recipes/mnist/zeroq_w4a4.gin", "--output_dir", str(out)]  # fmt: skip
    for p in [
        "SYNTH_IMAGES = 16",
        "SYNTH_BATCH = 4",
        "SYNTH_ITERS = 2",
        "BATCH_SIZE = 4",
        "ITERS_PER_EPOCH = 2",
        "train.naive_batches = 2",
        "train.trackers = None",
        f"generators.SyntheticSet.cache_dir = '{cache}'",
    ]:
        cmd += ["--gin_param", p]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (key,) = list(cache.iterdir())
    assert sorted(p.name for p in key.iterdir()) == [f"batch_{k:04d}.safetensors" for k in range(4)]
    report = json.loads((out / "metrics.json").read_text())["processes"]
    assert report["count"] == 2 and report["identical_student"]  # ranges merged over ranks
