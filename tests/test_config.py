import re
from pathlib import Path

import gin
import pytest

from dfqkit import config as cfg

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(  # the recipes and the base recipes they include (gin/recipes/)
    p.relative_to(REPO).as_posix()
    for root in ("recipes", "gin/recipes")
    for p in (REPO / root).rglob("*.gin")
)
REAL_MACROS = ["DATA_ROOT = '/nonexistent'", "TEACHER_WEIGHTS = '/nonexistent.pt'"]


def test_includes_resolve_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = cfg.parse(["recipes/mnist/gdfq_w4a4.gin"])
    assert files[0] == REPO / "recipes/mnist/gdfq_w4a4.gin"
    assert gin.query_parameter("%W_BITS") == 4
    assert gin.query_parameter("%BATCH_SIZE") == 64


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_parses_finalizes_and_exposes_the_standard_macros(recipe):
    cfg.parse([recipe], REAL_MACROS)
    for macro in cfg.STANDARD_MACROS:
        assert cfg.macro_value(macro) is not None, f"{recipe} lacks macro {macro}"
    for macro in ("TEACHER_WEIGHTS", "NUM_CLASSES", "IMAGE_SIZE", "CHANNELS"):
        assert cfg.macro_value(macro) is not None, f"{recipe} lacks macro {macro}"
    w, a = cfg.macro_value("W_BITS"), cfg.macro_value("A_BITS")
    stem = Path(recipe).stem
    if re.search(r"_w\d+a\d+$", stem):  # a bit-width recipe; a base recipe has no bits in its name
        assert stem.endswith(f"w{w}a{a}"), f"{recipe} name disagrees with W{w}A{a}"


def test_missing_required_macro_fails_naming_it():
    with pytest.raises(cfg.ConfigError) as err:
        cfg.parse(["recipes/gdfq/resnet20_cifar100_w4a4.gin"])
    msg = str(err.value)
    assert "DATA_ROOT" in msg and "TEACHER_WEIGHTS" in msg and "--gin_param" in msg


def test_unknown_binding_fails_before_compute():
    with pytest.raises(cfg.ConfigError, match="epochz"):
        cfg.parse(["recipes/mnist/gdfq_w4a4.gin"], ["train.epochz = 3"])
    gin.clear_config()
    with pytest.raises(cfg.ConfigError, match="BNStatLoss"):
        cfg.parse(["recipes/mnist/gdfq_w4a4.gin"], ["x = @losses.BNStatLoss()"])


def test_missing_file_and_no_file():
    with pytest.raises(cfg.ConfigError, match="not found"):
        cfg.parse(["recipes/nope.gin"])
    with pytest.raises(cfg.ConfigError, match="no gin file"):
        cfg.parse([])


def test_config_is_finalized_and_params_override_files():
    cfg.parse(["recipes/mnist/gdfq_w4a4.gin"], ["W_BITS = 3", "SEED = 7"])
    assert cfg.macro_value("W_BITS") == 3 and cfg.macro_value("SEED") == 7
    with pytest.raises(RuntimeError):
        gin.bind_parameter("train.epochs", 1)


def test_run_names():
    assert cfg.run_name(REPO / "recipes/mnist/gdfq_w4a4.gin") == "mnist_gdfq_w4a4"
    assert cfg.recipe_name(REPO / "recipes/quickstart.gin") == "recipes/quickstart.gin"
