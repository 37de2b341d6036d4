"""The ``dfqkit`` command: subcommands, recipe listing and a recipe's --help."""

import re
import subprocess
import sys

from dfqkit import cli
from dfqkit.recipes import describe, list_recipes


def test_every_subcommand_answers_help(capsys):
    for name in cli.COMMANDS:
        try:
            code = cli.main([name, "--help"])
        except SystemExit as exit_:  # argparse's own --help
            code = exit_.code
        assert code == 0
        assert f"usage: dfqkit {name}" in capsys.readouterr().out


def test_usage_and_an_unknown_command(capsys):
    assert cli.main([]) == 2 and "commands:" in capsys.readouterr().out
    assert cli.main(["trian"]) == 2
    assert "Did you mean 'train'?" in capsys.readouterr().err


def test_list_recipes_gives_each_recipe_its_title(capsys):
    found = dict(list_recipes())
    assert found["recipes/deit_w4a8.gin"].startswith("The paper's method")
    assert all(path.startswith("recipes/") and path.endswith(".gin") for path in found)
    assert cli.main(["list", "recipes"]) == 0
    out = capsys.readouterr().out
    assert "recipes/mnist/gdfq_w2a4.gin" in out and "GDFQ" in out


def test_a_recipes_help_names_its_required_and_common_macros():
    text = describe("recipes/gdfq/resnet18_imagenet_w4a4.gin")
    assert 'REQUIRED (set each with --gin_param "NAME = value"): DATA_ROOT, TEACHER_WEIGHTS' in text
    assert "Commonly overridden: SEED, EPOCHS, BATCH_SIZE" in text
    assert "  W_BITS          = 4" in text and "  DATA_ROOT       = REQUIRED" in text
    offline = describe("recipes/mnist/gdfq_w2a4.gin")
    assert offline.splitlines()[2].endswith(": none")
    assert re.search(r"^  W_BITS +?= 2$", offline, re.M) and "TEACHER_WEIGHTS = 'zoo'" in offline


def test_python_m_dfqkit_and_train_help_with_a_recipe(tmp_path):
    cmd = [sys.executable, "-m", "dfqkit", "train", "--gin", "recipes/deit_w4a8.gin", "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "usage: dfqkit train" in proc.stdout
    assert "REQUIRED" in proc.stdout and "TEACHER_WEIGHTS" in proc.stdout
