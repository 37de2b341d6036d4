"""A run directory is self-contained: resumed from its own configuration, the best model kept
and handed out, and a dfqkit.quantize run rebuilt like any other."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gin
import pytest
import torch

from dfqkit import bindings, rundir
from dfqkit import checkpoint as ckpt
from dfqkit import config as cfg
from dfqkit.errors import ConfigError
from dfqkit.evaluate import evaluate
from dfqkit.export import export_safetensors, load_quantized
from dfqkit.recipes import list_recipes
from dfqkit.train import run

TINY = [
    "EPOCHS = 3",
    "ITERS_PER_EPOCH = 2",
    "BATCH_SIZE = 8",
    "train.warmup_epochs = 1",
    "train.calib_epochs = 1",
    "train.naive_batches = 2",
    "LATENT_DIM = 8",
    "generators.ConditionalGenerator.width = 16",
    "train.trackers = None",
]
RECIPE = "recipes/mnist/gdfq_w4a4.gin"
REQUIRED = ["DATA_ROOT = '/x'", "TEACHER_WEIGHTS = '/x'"]


def _ordered_snapshot():
    return [(k, list(v.items())) for k, v in cfg.snapshot().items()]


@pytest.mark.parametrize("recipe", [p for p, _ in list_recipes()])
def test_config_gin_binds_what_the_recipe_binds_in_the_same_order(recipe, tmp_path):
    """The flattened config.gin is self-contained and parses to the very same bindings, in the
    same order (gin builds references in binding order, so the order decides initialisation)."""
    files = cfg.parse([recipe], REQUIRED, finalize=False, allow_required=True)
    want = _ordered_snapshot()
    assert bindings.unread_macros(bindings.macros_set(files, [])) == []  # no recipe sets in vain
    text = cfg.flatten([recipe], REQUIRED)
    assert not any(line.lstrip().startswith("include ") for line in text.splitlines())
    (tmp_path / "config.gin").write_text(text)
    cfg.parse([tmp_path / "config.gin"], finalize=False, allow_required=True)
    assert _ordered_snapshot() == want


@pytest.mark.slow
def test_resume_alone_continues_from_the_runs_own_config(teacher_env, tmp_path, monkeypatch):
    full = run([RECIPE], TINY, output_dir=tmp_path / "full")
    cut = tmp_path / "cut"
    run([RECIPE], [*TINY, "EPOCHS = 2"], output_dir=cut)  # "killed" after epoch 2
    (cut / "metrics.json").unlink()
    monkeypatch.chdir(tmp_path)  # from another working directory, with no recipe given
    gin.clear_config()
    resumed = run([], ["EPOCHS = 3"], output_dir=cut, resume=True)
    assert resumed["resumed_from_epoch"] == 2 and resumed["iterations"] == 6
    assert resumed["history"] == full["history"]  # bit-identical on CPU
    assert resumed["recipe"] == RECIPE
    text = (cut / "config.gin").read_text()
    assert text.rstrip().endswith("EPOCHS = 3")  # the accepted change is part of the config
    # the recipe's own defaults (20 × 50) are not taken silently: refused, naming each change
    gin.clear_config()
    with pytest.raises(ConfigError, match=r"ITERS_PER_EPOCH: 2 -> 50.*only EPOCHS"):
        run([RECIPE], [], output_dir=cut, resume=True)
    with pytest.raises(ConfigError, match=r"W_BITS: 4 -> 3"):
        run([], ["W_BITS = 3"], output_dir=cut, resume=True)
    assert (cut / "config.gin").read_text() == text  # a refused resume changes nothing


def test_what_may_change_on_resume():
    assert rundir.resumable("EPOCHS") and rundir.resumable("STUDENT_LR")
    assert rundir.resumable("student/torch.optim.SGD.lr") and rundir.resumable("CLIP_LR")
    assert not rundir.resumable("W_BITS") and not rundir.resumable("train.lr_milestones")
    assert not rundir.resumable("ITERS_PER_EPOCH") and not rundir.resumable("BATCH_SIZE")


def test_resume_of_a_directory_without_a_run_is_refused_or_said(tmp_path):
    with pytest.raises(ConfigError, match="not a dfqkit run directory"):
        rundir.open_run([], [], output_dir=tmp_path / "empty", resume=True)
    with pytest.raises(ConfigError, match="needs --output_dir"):
        rundir.open_run([], [], resume=True)


@pytest.mark.slow
def test_resume_without_a_checkpoint_says_so_first(teacher_env, tmp_path):
    out = tmp_path / "r"
    rundir.open_run([RECIPE], TINY, output_dir=out)  # configured, killed before epoch 1 ended
    rundir.unlock_run_dir(out)  # what its death would do
    gin.clear_config()
    cmd = [sys.executable, "-m", "dfqkit.train", "--resume", "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = proc.stderr.strip().splitlines()[0]
    assert "has no complete checkpoint: starting it from epoch 0" in first


@pytest.mark.slow
def test_the_best_checkpoint_is_kept_exported_and_reproduces_best_test_top1(teacher_env, tmp_path):
    out = tmp_path / "run"
    m = run([RECIPE], [*TINY, "EPOCHS = 4", "train.checkpoint_keep = 1"], output_dir=out)
    best = ckpt.best_checkpoint(out)
    assert best is not None and ckpt.checkpoint_epoch(best) == m["best"]["epoch"]
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("epoch")] == [
        "epoch-0004"
    ]
    path = export_safetensors(out)  # default: best
    student = load_quantized(path)
    data = rundir.load_run(out, which="last").data
    got = evaluate(student, data.loader("test", 256))["top1"]
    assert got == m["best"]["test_top1"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["models"]["student_quantized.safetensors"] == {
        "checkpoint": "best",
        "epoch": m["best"]["epoch"],
    }
    last = rundir.load_run(out, which="last")
    assert last.loaded == ("last", 4) and last.state.epochs_done == 4
    with pytest.raises(ConfigError, match="which must be one of"):
        rundir.load_run(out, which="newest")


@pytest.mark.slow
def test_a_quantize_run_is_exported_and_resumed_like_any_run(teacher_env, tmp_path):
    import dfqkit
    from dfqkit.data import mnist5k
    from dfqkit.models import mnist_resnet

    teacher = mnist_resnet()
    out = tmp_path / "q"
    student = dfqkit.quantize(
        teacher,
        method="gdfq",
        data=mnist5k(),
        epochs=3,
        iters_per_epoch=2,
        batch_size=8,
        output_dir=out,
        gin_params=TINY[3:],
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["recipe"] == "dfqkit.quantize(method='gdfq')"
    assert m["models"]["dfqkit.quantize"] == {"checkpoint": "best", "epoch": m["best"]["epoch"]}
    assert (out / "teacher.safetensors").is_file()
    got = evaluate(student, mnist5k().loader("test", 256))["top1"]
    assert got == m["best"]["test_top1"]  # what you get is the best epoch
    # the directory alone, moved elsewhere: exported and resumed
    moved = tmp_path / "elsewhere" / "q"
    shutil.copytree(out, moved)
    shutil.rmtree(out)
    gin.clear_config()
    exported = load_quantized(export_safetensors(moved))
    with torch.no_grad():
        x = torch.randn(4, 1, 28, 28)
        assert torch.equal(exported(x), student(x))
    gin.clear_config()
    resumed = run([], ["EPOCHS = 4"], output_dir=moved, resume=True)
    assert resumed["resumed_from_epoch"] == 3 and resumed["epochs_done"] == 4


# One process at a time per run directory (rundir.lock_run_dir).

HOLD = """
import sys, time
from pathlib import Path
from dfqkit import rundir
rundir.lock_run_dir(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


def _cli(args, cwd, env=None):
    cmd = [sys.executable, "-m", "dfqkit.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300, env=env)


def test_a_run_directory_in_use_is_refused_by_a_second_process_before_it_writes(tmp_path):
    """While this process holds the directory (a run alive), a second ``dfqkit.train`` on it, new
    or ``--resume``, is refused in one line naming the holder, and changes nothing there."""
    out = tmp_path / "run"
    out.mkdir()
    rundir.lock_run_dir(out)
    try:
        (out / "config.gin").write_text("EPOCHS = 3\n")
        for args in (
            ["--gin", RECIPE, "--output_dir", str(out)],
            ["--resume", "--output_dir", str(out)],
        ):
            proc = _cli(args, cwd=tmp_path)
            assert proc.returncode == 2, proc.stderr[-2000:]
            assert "is in use by another dfqkit run" in proc.stderr
            assert f"pid {os.getpid()} on " in proc.stderr  # the holder, from run.lock
            assert (out / "config.gin").read_text() == "EPOCHS = 3\n"
            assert not (out / "checkpoints").exists()
        rundir.lock_run_dir(out)  # re-entrant within the holding process
    finally:
        rundir.unlock_run_dir(out)
    assert Path(out.resolve()) not in rundir._HELD


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    """The lock is the kernel's: a holder killed with SIGKILL (no cleanup at all) frees it."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"in use by another dfqkit run \(pid {holder.pid} "):
            rundir.lock_run_dir(out)
        assert Path(out.resolve()) not in rundir._HELD
    finally:
        holder.kill()
        holder.wait()
    assert (out / rundir.LOCK).exists()  # the file stays; its lock does not
    rundir.lock_run_dir(out)
    try:
        assert f"pid {os.getpid()} " in (out / rundir.LOCK).read_text()
    finally:
        rundir.unlock_run_dir(out)


def test_only_the_main_rank_locks(tmp_path, monkeypatch):
    """Under a multi-process launch the other ranks open the same directory: only rank 0 locks."""
    out = tmp_path / "run"
    out.mkdir()
    monkeypatch.setenv("RANK", "1")
    rundir.lock_run_dir(out)
    assert Path(out.resolve()) not in rundir._HELD and not (out / rundir.LOCK).exists()


def test_a_refused_open_releases_the_lock(tmp_path):
    """A resume refused for its configuration, and a new run refused over an existing one, leave
    the directory free for the next try (here: another process)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.gin").write_text(cfg.flatten([RECIPE], REQUIRED))
    gin.clear_config()
    with pytest.raises(ConfigError, match=r"W_BITS: 4 -> 3"):
        rundir.open_run([], ["W_BITS = 3"], output_dir=out, resume=True)
    assert Path(out.resolve()) not in rundir._HELD
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "epoch-0001").mkdir()
    gin.clear_config()
    with pytest.raises(ConfigError, match="already holds a run"):
        rundir.open_run([RECIPE], [], output_dir=out, trusted=REQUIRED)
    assert Path(out.resolve()) not in rundir._HELD
    probe = HOLD.replace("time.sleep(600)", "")
    proc = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_forked_child_does_not_keep_the_lock_after_its_parent_dies(tmp_path):
    """DataLoader workers are forked: once the run's process is gone, a surviving child must
    not hold the directory (they outlive a killed parent by seconds)."""
    out = tmp_path / "run"
    out.mkdir()
    script = HOLD.replace(
        'print("held", flush=True)',
        "import os\npid = os.fork()\nif pid == 0:\n    time.sleep(600)\n"
        'print("held", pid, flush=True)',
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True
    )
    word, child = holder.stdout.readline().split()
    try:
        assert word == "held"
        with pytest.raises(ConfigError, match="in use"):
            rundir.lock_run_dir(out)
        holder.kill()
        holder.wait()
        os.kill(int(child), 0)  # the child is still alive...
        rundir.lock_run_dir(out)  # ...and the directory is free
    finally:
        rundir.unlock_run_dir(out)
        os.kill(int(child), 9)
