"""A run killed with SIGKILL during a generator step, during a checkpoint write and during
evaluation resumes with ``--resume`` from its last complete checkpoint and ends bit-identical to
an uninterrupted run with the same seed (CPU, same thread count)."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file

from dfqkit import checkpoint as ckpt

PARAMS = [
    "EPOCHS = 4",
    "ITERS_PER_EPOCH = 2",
    "BATCH_SIZE = 8",
    "train.warmup_epochs = 1",
    "train.calib_epochs = 1",
    "LATENT_DIM = 8",
    "generators.ConditionalGenerator.width = 16",
    "train.trackers = None",
]
RECIPE = "recipes/mnist/gdfq_w4a4.gin"

# The driver kills its own process at an exact point, from inside: the n-th call of the patched
# function. With 2 iterations per epoch, call 5 of synthesize is epoch 3's first generator step;
# save_state's 3rd call writes epoch 3's checkpoint (killed after its files are written, one of
# them truncated, before it is marked complete); evaluate's 7th call is epoch 3's validation
# (calls 1-2 are the teacher and naive references, then two per epoch).
DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path

    fault, at = sys.argv[1], int(sys.argv[2])
    calls = {"n": 0}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def counting(original, before=None, after=None):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == at and before:
                before(*args, **kwargs)
            out = original(*args, **kwargs)
            if calls["n"] == at and after:
                after(*args, **kwargs)
            return out
        return wrapped

    if fault == "generator_step":
        import dfqkit.engine as engine
        engine.synthesize = counting(engine.synthesize, after=lambda *a, **k: die())
    elif fault == "checkpoint_write":
        import accelerate

        def half_written(self, output_dir=None, **kwargs):
            part = Path(output_dir) / "model_1.safetensors"
            part.write_bytes(part.read_bytes()[:100])
            die()

        accelerate.Accelerator.save_state = counting(
            accelerate.Accelerator.save_state, after=half_written
        )
    elif fault == "evaluation":
        import dfqkit.run as run
        run.evaluate = counting(run.evaluate, before=lambda *a, **k: die())

    from dfqkit.train import main
    sys.exit(main(sys.argv[3:]))
    """
)
FAULTS = {"generator_step": 5, "checkpoint_write": 3, "evaluation": 7}


def _run(tmp_path, out, fault="none", at=0, resume=False):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    cmd = [sys.executable, str(script), fault, str(at), "--gin", RECIPE, "--output_dir", str(out)]
    for p in PARAMS:
        cmd += ["--gin_param", p]
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, zoo_teacher):
    old = os.environ.get("DFQKIT_CACHE")
    os.environ["DFQKIT_CACHE"] = str(zoo_teacher)
    root = tmp_path_factory.mktemp("faults")
    done = _run(root, root / "uninterrupted")
    assert done.returncode == 0, done.stderr[-2000:]
    yield root / "uninterrupted"
    if old is None:
        os.environ.pop("DFQKIT_CACHE", None)
    else:
        os.environ["DFQKIT_CACHE"] = old


def _final_student(run_dir):
    return load_file(ckpt.latest_checkpoint(run_dir) / "model_1.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_killed_run_resumes_bit_identical(fault, reference, tmp_path):
    out = tmp_path / "run"
    killed = _run(tmp_path, out, fault, FAULTS[fault])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "metrics.json").exists()
    assert ckpt.latest_checkpoint(out).name == "epoch-0002"  # epoch 3 never completed
    if fault == "checkpoint_write":
        half = out / "checkpoints" / ".tmp-epoch-0003"
        assert half.is_dir() and not (half / ckpt.COMPLETE).exists()

    resumed = _run(tmp_path, out, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads((out / "metrics.json").read_text())
    want = json.loads((reference / "metrics.json").read_text())
    assert got["resumed_from_epoch"] == 2 and got["epochs_done"] == 4
    for key in ("history", "best", "last", "teacher", "naive", "iterations"):
        assert got[key] == want[key], key  # exact floats: bit-identical
    a, b = _final_student(out), _final_student(reference)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert not (out / "checkpoints" / ".tmp-epoch-0003").exists()  # the half-write was cleaned
