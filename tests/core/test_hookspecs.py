"""Each hook, implemented by a plugin object, registers a component of its kind — and the built-in
plugins use every hook."""

from __future__ import annotations

import pytest
from instructrl.core.errors import PluginError
from instructrl.core.hookspecs import hookimpl
from instructrl.core.registry import KINDS, BuildContext, make_registry

HOOK_KIND = {
    "register_tasks": "task",
    "register_policies": "policy",
    "register_value_models": "value_model",
    "register_reward_models": "reward_model",
    "register_advantage_estimators": "advantage",
    "register_objectives": "objective",
    "register_kl_estimators": "kl_estimator",
    "register_kl_controllers": "kl_controller",
    "register_reward_transforms": "reward_transform",
    "register_extra_losses": "extra_loss",
    "register_loggers": "logger",
    "register_stages": "stage",
    "register_commands": "command",
}


def test_the_table_covers_every_kind():
    assert {KINDS[k].hook: k for k in KINDS} == HOOK_KIND


@pytest.mark.parametrize(("hook", "kind"), list(HOOK_KIND.items()))
def test_a_plugin_implementing_the_hook_registers_that_kind(hook, kind):
    built = []

    def implementation(register):
        def make_probe(config, ctx):
            """A probe component."""
            built.append(ctx.seed)
            return "not checked here"

        register("probe", make_probe)

    plugin = type(f"Probe_{hook}", (), {hook: staticmethod(hookimpl(implementation))})()
    if KINDS[kind].instance:  # stages and commands register an object, checked at registration
        reg = make_registry([plugin], autoload=False, strict=False)
        assert "probe" not in reg.names(kind)
        assert (
            f"{kind} 'probe'" in reg.broken[0].error and KINDS[kind].protocol.__name__ in reg.broken[0].error
        )
        return
    reg = make_registry([plugin], autoload=False)
    spec = reg.get(kind, "probe")
    assert spec.kind == kind and spec.description == "A probe component."
    # the factory is called with the context; the product is checked against the kind's protocol
    with pytest.raises(
        PluginError, match=rf"{kind} 'probe' .* does not implement {KINDS[kind].protocol.__name__}"
    ):
        reg.build(kind, "probe", None, BuildContext(registry=reg, seed=7))
    assert built == [7]
    for other in KINDS:
        if other != kind:
            assert "probe" not in reg.names(other)


@pytest.mark.parametrize("kind", list(KINDS))
def test_builtins_populate_every_kind(registry, kind):
    assert registry.names(kind), f"no built-in {kind}"
