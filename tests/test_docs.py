import os
import subprocess
import sys
from pathlib import Path

import pytest

from dfqkit.list import components_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_components_md_is_current():
    text = (DOCS / "components.md").read_text()
    assert text == components_markdown(), (
        "docs/components.md is stale: run python -m dfqkit.list --markdown > docs/components.md"
    )


def test_every_registered_component_is_documented():
    from dfqkit.registry import list_components

    text = (DOCS / "components.md").read_text()
    for entry in list_components():
        assert f"`@{entry.kind}.{entry.name}`" in text


def _blocks(text, lang):
    parts = text.split(f"```{lang}\n")[1:]
    return [p.split("```")[0] for p in parts]


@pytest.mark.slow
def test_adding_a_component_walkthrough_runs_as_written(teacher_env, tmp_path):
    text = (DOCS / "adding_a_component.md").read_text()
    (module, test), (gin_file,) = _blocks(text, "python"), _blocks(text, "gin")
    (tmp_path / "my_losses.py").write_text(module)
    (tmp_path / "test_my_losses.py").write_text(test)
    (tmp_path / "my_experiment.gin").write_text(gin_file)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    tiny = [
        "EPOCHS = 1",
        "ITERS_PER_EPOCH = 2",
        "BATCH_SIZE = 8",
        "train.warmup_epochs = 0",
        "train.calib_epochs = 1",
        "train.naive_batches = 2",
        "train.trackers = None",
    ]
    cmd = [
        sys.executable,
        "-m",
        "dfqkit.train",
        "--gin",
        "my_experiment.gin",
        "--output_dir",
        "runs/class_balance",
    ]
    for p in tiny:
        cmd += ["--gin_param", p]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    operative = (tmp_path / "runs/class_balance/operative_config.gin").read_text()
    assert (
        "@losses.ClassBalanceLoss()" in operative and "ClassBalanceLoss.weight = 0.5" in operative
    )
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_losses.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert tests.returncode == 0 and "2 passed" in tests.stdout, tests.stdout[-2000:]


def test_recipes_md_covers_every_recipe_family():
    text = (DOCS / "recipes.md").read_text()
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    for sub in sorted(p for p in recipes.iterdir() if p.is_dir()):
        assert f"{sub.name}/" in text, f"recipes/{sub.name}/ is not in docs/recipes.md"
    for f in sorted(recipes.rglob("*.gin")):
        family = f.stem.rsplit("_w", 1)[0]  # gdfq_w2a4 -> gdfq, resnet20_cifar10_w4a4 -> ...
        assert family in text or f.name in text, f"{f.relative_to(recipes)} not in recipes.md"
