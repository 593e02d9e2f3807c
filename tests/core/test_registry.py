"""The plugin registry: built-ins through the same hooks, attribution, duplicates, unknown names,
entry-point discovery and its failure message, block validation."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from instructrl.core.errors import ConfigError, PluginError
from instructrl.core.fields import param
from instructrl.core.hookspecs import hookimpl
from instructrl.core.registry import KINDS, BuildContext, make_plugin_manager, make_registry


@dataclass
class ToyConfig:
    width: float = param(1.0, "How wide.")
    depth: int = param(2, "How deep.")

    def __post_init__(self) -> None:
        if self.width <= 0:
            raise ValueError(f"width must be > 0 (got {self.width})")


class ToyPlugin:
    """A plugin object registering one KL estimator with a typed config."""

    @hookimpl
    def register_kl_estimators(self, register):
        def make_toy(config, ctx):
            """A toy estimator for tests."""
            return SimpleNamespace(needs_logits=False, width=config.width)

        register("toy", make_toy, config=ToyConfig)


class ClashPlugin:
    @hookimpl
    def register_kl_estimators(self, register):
        register("toy", lambda c, ctx: None, description="the same name again")


class BrokenPlugin:
    @hookimpl
    def register_objectives(self, register):
        raise RuntimeError("boom")


def test_builtins_register_with_the_instructrl_package(registry):
    rows = [s.as_dict() for s in registry.all()]
    assert rows, "no built-in component registered"
    assert {r["package"] for r in rows} == {"instructrl"}
    assert all(r["description"] for r in rows), [r for r in rows if not r["description"]]
    # every row has exactly the documented keys
    assert all(set(r) == {"kind", "name", "package", "description"} for r in rows)


def test_extra_plugin_is_attributed_and_built_with_its_config():
    reg = make_registry([ToyPlugin()], autoload=False)
    spec = reg.get("kl_estimator", "toy")
    assert spec.description == "A toy estimator for tests."
    assert (
        spec.package == "test_registry" or spec.package.endswith("test_registry") or spec.package == "tests"
    )
    conf = reg.config_for_block("kl_estimator", "toy", {"width": 3}, "kl")
    assert conf == ToyConfig(width=3.0, depth=2)
    est = reg.build("kl_estimator", "toy", conf, BuildContext(registry=reg))
    assert est.width == 3.0


def test_duplicate_name_names_both_providers():
    with pytest.raises(PluginError) as err:
        make_registry([ToyPlugin(), ClashPlugin()], autoload=False)
    msg = str(err.value)
    assert "kl_estimator 'toy' is registered twice" in msg
    assert msg.count("package '") == 2


def test_clash_with_a_builtin_names_instructrl():
    class Clash:
        @hookimpl
        def register_reward_models(self, register):
            register("learned", lambda c, ctx: None, description="x")

    with pytest.raises(
        PluginError, match=r"reward_model 'learned' is registered twice: by package 'instructrl'"
    ):
        make_registry([Clash()], autoload=False)


def test_plugin_raising_in_its_hook_is_named():
    with pytest.raises(PluginError, match=r"failed in register_objectives: boom"):
        make_registry([BrokenPlugin()], autoload=False)


def test_unknown_name_lists_valid_names_and_suggests(registry):
    with pytest.raises(ConfigError) as err:
        registry.get("reward_model", "lerned")
    msg = str(err.value)
    assert msg.startswith("reward.name: unknown reward_model 'lerned'; did you mean 'learned'?")
    for name in registry.names("reward_model"):
        assert name in msg


def test_block_validation_errors_are_one_line_with_the_key():
    reg = make_registry([ToyPlugin()], autoload=False)
    with pytest.raises(
        ConfigError, match=r"^kl\.widht: unknown key for kl_estimator 'toy'; did you mean 'width'\?"
    ):
        reg.config_for_block("kl_estimator", "toy", {"widht": 3}, "kl")
    with pytest.raises(
        ConfigError, match=r"^kl\.width: Value 'wide' of type 'str' could not be converted to Float"
    ):
        reg.config_for_block("kl_estimator", "toy", {"width": "wide"}, "kl")
    with pytest.raises(ConfigError, match=r"^kl\.width must be > 0 \(got -1\.0\)$"):
        reg.config_for_block("kl_estimator", "toy", {"width": -1}, "kl")


def test_every_kind_has_a_hook_in_hookspecs():
    from instructrl.core import hookspecs

    for kind in KINDS.values():
        assert callable(getattr(hookspecs, kind.hook)), kind


class _FakeDist:
    name = "broken-plugin-pkg"


class _FakeEntryPoint:
    name = "broken"
    value = "broken_plugin_pkg.plugin"
    dist = _FakeDist()

    def load(self):
        raise ImportError("No module named 'nonexistent_dependency'")


def test_entry_point_import_failure_names_plugin_and_package(monkeypatch):
    def fake_entry_points(group=None):
        return [_FakeEntryPoint()] if group == "instructrl" else []

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    with pytest.raises(PluginError) as err:
        make_plugin_manager(autoload=True)
    msg = str(err.value)
    assert "plugin 'broken' from package 'broken-plugin-pkg' failed to import" in msg
    assert "nonexistent_dependency" in msg


def test_autoload_env_var_blocks_entry_points_but_not_builtins(monkeypatch):
    calls = []

    def fake_entry_points(group=None):
        calls.append(group)
        return [_FakeEntryPoint()]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    monkeypatch.setenv("INSTRUCTRL_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm, packages = make_plugin_manager()
    assert calls == []
    from instructrl.plugins import DEFAULT_PLUGINS

    assert set(DEFAULT_PLUGINS) <= set(packages)
