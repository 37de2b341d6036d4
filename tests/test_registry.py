import sys
import textwrap

import gin
import pytest

from dfqkit import registry
from dfqkit.losses import BNStatsLoss
from dfqkit.registry import RegistryError, get, list_components, register


def test_builtins_are_registered_under_every_kind():
    names = {(e.kind, e.name) for e in list_components()}
    assert ("losses", "BNStatsLoss") in names
    assert ("generators", "ConditionalGenerator") in names
    assert ("mixers", "NoMixer") in names
    assert ("quantizers", "EMAActQuantizer") in names
    assert ("models", "mnist_resnet") in names
    assert get("losses", "BNStatsLoss") is BNStatsLoss


def test_unknown_name_lists_valid_names_and_suggests():
    with pytest.raises(RegistryError) as err:
        get("losses", "BNStatLoss")
    msg = str(err.value)
    assert "valid names" in msg and "KDLoss" in msg
    assert "Did you mean 'BNStatsLoss'?" in msg


def test_unknown_kind_fails_with_kinds():
    with pytest.raises(RegistryError, match="valid kinds: models, generators"):
        register("loss")
    with pytest.raises(RegistryError, match="Did you mean 'losses'"):
        list_components("loss")


def test_duplicate_name_names_the_first_definition():
    with pytest.raises(RegistryError) as err:

        @register("losses", name="KDLoss")
        class Other:  # noqa: F841
            pass

    assert "dfqkit.losses.kd:KDLoss" in str(err.value)


def test_gin_names_components_by_kind():
    gin.parse_config("x = @losses.BNStatsLoss()\nlosses.BNStatsLoss.weight = 0.5")
    loss = gin.query_parameter("%x").scoped_configurable_fn()
    assert isinstance(loss, BNStatsLoss) and loss.weight == 0.5


def test_plugin_entry_point_registers_components(tmp_path, monkeypatch):
    pkg = tmp_path / "dfq_tiny_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent("""
        from dfqkit.losses.base import Loss
        from dfqkit.registry import register

        @register("losses")
        class TinyPluginLoss(Loss):
            '''A loss from a third-party package.'''

            def compute(self, step):
                return step.teacher_logits.sum() * 0
    """)
    )
    dist = tmp_path / "dfq_tiny_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dfq-tiny-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[dfqkit.plugins]\ntiny = dfq_tiny_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    try:
        assert "tiny" in registry.load_plugins()
        entry = {e.name: e for e in list_components("losses")}["TinyPluginLoss"]
        assert entry.summary == "A loss from a third-party package."
        gin.parse_config("y = @losses.TinyPluginLoss()")
    finally:
        registry._REGISTRY["losses"].pop("TinyPluginLoss", None)
        sys.modules.pop("dfq_tiny_plugin", None)


def test_list_command_prints_one_line_per_component(capsys):
    from dfqkit.list import main

    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("losses:")
    assert any(
        line.split()[0] == "KDLoss" and len(line.split()) > 1 for line in out.splitlines()[1:]
    )
    assert main(["nope"]) == 2
