"""The plugin registry: built-ins through the same hooks, attribution, duplicates, unknown names,
entry-point discovery and its failure message, block validation."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

import pytest
from instructrl.core.errors import ConfigError, PluginError
from instructrl.core.fields import param
from instructrl.core.hookspecs import hookimpl
from instructrl.core.registry import KINDS, BuildContext, make_plugin_manager, make_registry
from instructrl.core.types import Needs


@dataclass
class ToyConfig:
    width: float = param(1.0, "How wide.")
    depth: int = param(2, "How deep.")

    def __post_init__(self) -> None:
        if self.width <= 0:
            raise ValueError(f"width must be > 0 (got {self.width})")


class ToyEstimator:
    def __init__(self, width):
        self.width = width

    def __call__(self, inp):
        return (inp.logprobs - inp.ref_logprobs).clamp(-self.width, self.width)


class ToyPlugin:
    """A plugin object registering one KL estimator with a typed config."""

    @hookimpl
    def register_kl_estimators(self, register):
        def make_toy(config, ctx):
            """A toy estimator for tests."""
            return ToyEstimator(config.width)

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
    assert all(set(r) == {"kind", "name", "package", "plugin", "description"} for r in rows)


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
    _, _, broken = make_plugin_manager(autoload=True)
    assert [b.plugin for b in broken] == ["broken"]
    msg = broken[0].message()
    assert "plugin 'broken' from package 'broken-plugin-pkg' failed to load" in msg
    assert "nonexistent_dependency" in msg and "INSTRUCTRL_DISABLE_PLUGINS=broken" in msg
    with pytest.raises(PluginError, match="INSTRUCTRL_DISABLE_PLUGINS=broken"):
        make_registry(autoload=True)  # strict: other commands stop, naming it
    assert make_registry(autoload=True, strict=False).broken[0].plugin == "broken"


def test_autoload_env_var_blocks_entry_points_but_not_builtins(monkeypatch):
    calls = []

    def fake_entry_points(group=None):
        calls.append(group)
        return [_FakeEntryPoint()]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    monkeypatch.setenv("INSTRUCTRL_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm, packages, _ = make_plugin_manager()
    assert calls == []
    from instructrl.plugins import DEFAULT_PLUGINS

    assert set(DEFAULT_PLUGINS) <= set(packages)


# -- Plugin API v1: protocol check, capabilities, hygiene ------------------------------------


def _plugin(hook, name, factory, **kw):
    def implementation(register):
        register(name, factory, **kw)

    return type(f"P_{name}", (), {hook: staticmethod(hookimpl(implementation))})()


class NoAggregation:
    def __call__(self, inp):
        return inp


class TwoArgEstimator:
    def __call__(self, logprobs, ref_logprobs):
        return logprobs - ref_logprobs


def test_a_component_missing_a_protocol_member_is_one_line_naming_plugin_kind_and_member():
    reg = make_registry(
        [_plugin("register_objectives", "bad_obj", lambda c, ctx: NoAggregation())], autoload=False
    )
    with pytest.raises(PluginError) as err:
        reg.build("objective", "bad_obj", None, BuildContext(registry=reg))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("objective 'bad_obj' (plugin ") and "does not implement Objective" in msg
    assert "missing attribute 'aggregation'" in msg


def test_a_method_whose_parameters_do_not_match_is_rejected():
    reg = make_registry(
        [_plugin("register_kl_estimators", "two_args", lambda c, ctx: TwoArgEstimator())], autoload=False
    )
    with pytest.raises(
        PluginError, match=r"kl_estimator 'two_args' .* method __call__ requires argument 'ref_logprobs'"
    ):
        reg.build("kl_estimator", "two_args", None, BuildContext(registry=reg))


def test_a_stateful_declaration_requires_the_stateful_protocol():
    class Plain:
        def __call__(self, inp):
            return inp.scores

    plugin = _plugin(
        "register_reward_transforms", "forgetful", lambda c, ctx: Plain(), needs=Needs(stateful=True)
    )
    reg = make_registry([plugin], autoload=False)
    with pytest.raises(PluginError, match=r"does not implement Stateful: missing method state_dict"):
        reg.build("reward_transform", "forgetful", None, BuildContext(registry=reg))


def test_an_extra_loss_named_like_a_recipe_section_is_a_broken_plugin_naming_both_owners():
    plugin = _plugin("register_extra_losses", "eval", lambda c, ctx: None)
    with pytest.raises(
        PluginError, match=r"recipe section 'eval' is claimed twice: by stage 'eval' of package 'instructrl'"
    ):
        make_registry([plugin], autoload=False)
    reg = make_registry([plugin], autoload=False, strict=False)
    assert "eval" not in reg.names("extra_loss") and "eval" in reg.names("stage")
    assert "INSTRUCTRL_DISABLE_PLUGINS=" in reg.broken[0].message()


def test_disable_plugins_env_skips_named_plugins(monkeypatch):
    monkeypatch.setenv("INSTRUCTRL_DISABLE_PLUGINS", "instructrl.plugins.kl, instructrl.plugins.objectives")
    reg = make_registry(autoload=False)
    assert (
        reg.names("kl_estimator") == [] and reg.names("kl_controller") == [] and reg.names("objective") == []
    )
    assert "gae" in reg.names("advantage")


def test_needs_are_read_without_building_and_dry_run_builds_nothing(tmp_path):
    from instructrl.core.api import describe
    from instructrl.core.config import load_recipe

    reg = make_registry(autoload=False)
    for overrides in (
        [],
        ["advantage.name=remax", "kl.estimator=full", "reward_transforms=[{name: running_whiten}]"],
    ):
        recipe = load_recipe("instructgpt", overrides, smoke=True, registry=reg)
        info = describe(recipe, tmp_path / "run")
        assert reg.builds == 0, "a component was built during validation or --dry-run"
    d = info["derived"]["components"]
    assert (
        d["greedy_baseline"] and d["needs_logits"] and not d["needs_values"] and d["samples_per_prompt"] == 1
    )
    assert ["reward_transform", "running_whiten", "reward_transforms[0]"] in [list(x) for x in d["stateful"]]
