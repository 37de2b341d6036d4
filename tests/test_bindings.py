"""What a configuration binds must be read by something (typos fail, with a suggestion)."""

import gin
import pytest

from dfqkit import bindings
from dfqkit import config as cfg
from dfqkit.errors import ConfigError

DIVERSITY = "recipes/mnist/diversity_w4a3.gin"


def test_a_macro_set_in_vain_is_named_with_the_closest_one():
    files = cfg.parse([DIVERSITY], ["HAEDS = 0"], finalize=False)
    errors = bindings.unread_macros(bindings.macros_set(files, ["HAEDS = 0"]))
    assert errors == [
        "macro HAEDS is set but nothing in the configuration reads it. "
        "Did you mean 'HEADS', 'CHANNELS'?"
    ]
    # a macro that is read is fine, as is one a fragment sets for a part the recipe replaced
    files = cfg.parse(["recipes/mnist/hast_w4a4.gin"], ["HEADS = 2"], finalize=False)
    assert bindings.unread_macros(bindings.macros_set(files, [])) == []
    assert "TARGET_PRO" in bindings.defined_macros() - bindings.referenced_macros()


def test_macros_set_reads_the_top_of_the_given_files_and_the_bindings(tmp_path):
    recipe = tmp_path / "r.gin"
    recipe.write_text(f"include '{DIVERSITY}'\nLEVELS = 2\nmixers.Mixup.alpha = 0.2\n")
    assert bindings.macros_set([recipe], ["EPOCHS = 1", "train.epochs = 2"]) == {
        "LEVELS",
        "EPOCHS",
    }


def test_gin_lookup_errors_get_the_closest_registered_names():
    cfg.register_configurables()
    with pytest.raises(ConfigError, match=r"Did you mean 'mixers.Mixup'"):
        cfg.parse(["recipes/mnist/gdfq_w4a4.gin"], ["train.mixer = @mixers.MixUp()"])
    with pytest.raises(ConfigError, match=r"'epochz'. .*Did you mean 'epochs'"):
        cfg.parse(["recipes/mnist/gdfq_w4a4.gin"], ["train.epochz = 3"])
    assert bindings.hint("something else entirely") == ""


def test_a_binding_of_a_part_that_was_never_built_is_named():
    cfg.parse(["recipes/mnist/gdfq_w4a4.gin"], ["mixers.Mixup.alpha = 0.3"], finalize=False)
    key = ("", "dfqkit.mixers.Mixup", "alpha")
    assert key in bindings.bound_keys()
    gin.get_configurable("dfqkit.mixers.NoMixer")()  # what a build would call
    (error,) = bindings.unread_bindings([key, ("", "dfqkit.mixers.NoMixer", "x")])
    assert error.startswith("binding mixers.Mixup.alpha is read by nothing")
    assert "Did you mean 'mixers.NoMixer'" in error
    assert bindings.display(("student", "torch.optim.SGD", "lr")) == "student/torch.optim.SGD.lr"
