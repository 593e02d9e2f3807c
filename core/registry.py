"""The plugin registry: one pluggy manager, one ``register`` callback per kind, one lookup.

Built-in plugins (``instructrl.plugins.DEFAULT_PLUGINS``) are always loaded; third-party packages
are discovered through the entry-point group ``instructrl`` unless
``INSTRUCTRL_DISABLE_PLUGIN_AUTOLOAD`` is set. A duplicate name within a kind is an error naming
both providing packages; an unknown name is an error listing the valid names.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .fields import check_keys, field_names, validate
from .errors import ConfigError, PluginError, did_you_mean, one_of

ENTRY_POINT_GROUP = "instructrl"
DISABLE_AUTOLOAD_ENV = "INSTRUCTRL_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_PACKAGE = "instructrl"


@dataclass(frozen=True)
class Kind:
    """A component kind: its name, the hook that registers it and the recipe key that selects it."""

    name: str
    hook: str
    recipe_key: str
    protocol: str


KINDS: dict[str, Kind] = {
    k.name: k
    for k in [
        Kind("task", "register_tasks", "task.name", "Task"),
        Kind("policy", "register_policies", "policy.name", "Policy"),
        Kind("value_model", "register_value_models", "value.name", "ValueModel"),
        Kind("reward_model", "register_reward_models", "reward.name", "RewardModel"),
        Kind("advantage", "register_advantage_estimators", "advantage.name", "AdvantageEstimator"),
        Kind("objective", "register_objectives", "objective.name", "Objective"),
        Kind("kl_estimator", "register_kl_estimators", "kl.estimator", "KLEstimator"),
        Kind("kl_controller", "register_kl_controllers", "kl.controller", "KLController"),
        Kind("reward_transform", "register_reward_transforms", "reward_transforms[].name", "RewardTransform"),
        Kind("extra_loss", "register_extra_losses", "<name>.coef", "ExtraLoss"),
        Kind("logger", "register_loggers", "loggers[].name", "Logger"),
        Kind("stage", "register_stages", "stages[]", "Stage"),
        Kind("command", "register_commands", "instructrl <command>", "Command"),
    ]
}


@dataclass(frozen=True)
class ComponentSpec:
    """One registered component."""

    kind: str
    name: str
    factory: Callable[..., Any]
    config: type | None
    description: str
    package: str
    plugin: str

    def as_dict(self) -> dict[str, str]:
        """``{kind, name, package, description}`` (the ``instructrl plugins --json`` row)."""
        return {
            "kind": self.kind,
            "name": self.name,
            "package": self.package,
            "description": self.description,
        }


@dataclass
class BuildContext:
    """What a factory may need beyond its config. Fields a stage does not have are ``None``.

    Attributes:
        registry: the registry (to build nested components, e.g. ``ensemble`` members).
        seed: the seed of the stage being built.
        task: the built Task.
        tokenizer: the policy's HF tokenizer.
        stage_dir: the directory of the stage being built (loggers write there).
        reward_model: the built reward model (``demo_bias`` reads its statistics).
        paths: output model dirs of upstream stages, ``{"sft": ".../model"}``.
        extras: anything else a stage hands over (documented by the stage).
    """

    registry: Registry
    seed: int = 0
    task: Any = None
    tokenizer: Any = None
    stage_dir: str | None = None
    reward_model: Any = None
    paths: dict[str, str] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def resolve(self, value: str, key: str) -> str:
        """A path from a recipe value: ``@stage`` becomes that stage's output model dir."""
        if value.startswith("@"):
            if value[1:] not in self.paths:
                raise ConfigError(
                    f"{key}: '{value}' refers to a stage output this run does not produce (available: {one_of(self.paths)})"
                )
            return self.paths[value[1:]]
        return value


def _first_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


class Registry:
    """Every registered component, by kind and name."""

    def __init__(self, pm: pluggy.PluginManager, packages: Mapping[str, str]) -> None:
        self.pm = pm
        self._packages = dict(packages)  # plugin name -> providing package
        self._specs: dict[str, dict[str, ComponentSpec]] = {k: {} for k in KINDS}
        for kind in KINDS.values():
            self._collect(kind)

    # -- collection ---------------------------------------------------------------------------
    def _collect(self, kind: Kind) -> None:
        caller = getattr(self.pm.hook, kind.hook)
        # Call each implementation on its own so every registration is attributed to its plugin.
        for impl in caller.get_hookimpls():  # registration order: built-ins first
            plugin_name = self.pm.get_name(impl.plugin) or repr(impl.plugin)
            package = self._packages.get(plugin_name, _package_of(impl.plugin))

            def register(
                name: str,
                factory: Callable[..., Any],
                *,
                config: type | None = None,
                description: str | None = None,
                _pkg: str = package,
                _plugin: str = plugin_name,
                _kind: str = kind.name,
            ) -> None:
                self._add(
                    ComponentSpec(
                        _kind, name, factory, config, description or _first_line(factory), _pkg, _plugin
                    )
                )

            try:
                impl.function(register=register)
            except PluginError:
                raise
            except Exception as exc:  # a plugin's own bug: name it
                raise PluginError(
                    f"plugin '{plugin_name}' (package '{package}') failed in {kind.hook}: {exc}"
                ) from exc

    def _add(self, spec: ComponentSpec) -> None:
        if not spec.name or not isinstance(spec.name, str):
            raise PluginError(f"package '{spec.package}' registered a {spec.kind} with an empty name")
        existing = self._specs[spec.kind].get(spec.name)
        if existing is not None:
            raise PluginError(
                f"{spec.kind} '{spec.name}' is registered twice: by package '{existing.package}' "
                f"(plugin {existing.plugin}) and by package '{spec.package}' (plugin {spec.plugin})"
            )
        self._specs[spec.kind][spec.name] = spec

    # -- lookup -------------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        """Registered names of ``kind``, sorted."""
        return sorted(self._specs[kind])

    def all(self) -> list[ComponentSpec]:
        """Every component, ordered by kind then name."""
        return [self._specs[k][n] for k in KINDS for n in sorted(self._specs[k])]

    def get(self, kind: str, name: str, key: str | None = None) -> ComponentSpec:
        """The spec of ``kind``/``name``; a :class:`ConfigError` listing valid names otherwise."""
        if kind not in self._specs:
            raise ConfigError(f"unknown component kind '{kind}' (kinds: {one_of(KINDS)})")
        spec = self._specs[kind].get(str(name))
        if spec is None:
            where = key or KINDS[kind].recipe_key
            valid = self.names(kind)
            raise ConfigError(
                f"{where}: unknown {kind} '{name}'{did_you_mean(str(name), valid)} (valid: {one_of(valid)})"
            )
        return spec

    def config_for_block(self, kind: str, name: str, block: Mapping[str, Any], path: str) -> Any:
        """Validate a component's own keys (``block``, selector keys removed) against its config
        dataclass; ``None`` for components without one.

        Keys that belong to another component of the same kind are ignored, so a sweep over the
        selector keeps working; any other unknown key is an error with a "did you mean".
        """
        spec = self.get(kind, name)
        own_fields = field_names(spec.config)
        siblings = {f for s in self._specs[kind].values() for f in field_names(s.config)}
        check_keys(block, own_fields, path, f"{kind} '{name}'", ignorable=siblings)
        if spec.config is None:
            return None
        return validate(spec.config, {k: v for k, v in block.items() if k in own_fields}, path)

    def build(self, kind: str, name: str, config: Any, ctx: BuildContext) -> Any:
        """Call the component's factory with its validated config and ``ctx``."""
        spec = self.get(kind, name)
        return spec.factory(config, ctx)


def _package_of(plugin: Any) -> str:
    module = plugin if isinstance(plugin, ModuleType) else inspect.getmodule(plugin)
    name = getattr(module, "__name__", "") or ""
    top = name.split(".")[0]
    if top == BUILTIN_PACKAGE:
        return BUILTIN_PACKAGE
    dists = importlib.metadata.packages_distributions().get(top)
    return dists[0] if dists else (top or "<unknown>")


def make_plugin_manager(
    extra_plugins: Iterable[Any] = (), *, autoload: bool | None = None
) -> tuple[pluggy.PluginManager, dict[str, str]]:
    """A plugin manager with the hookspecs, the default plugins, entry-point plugins (unless
    disabled) and ``extra_plugins`` (modules or objects with hook implementations)."""
    from instructrl.plugins import DEFAULT_PLUGINS

    pm = pluggy.PluginManager("instructrl")
    pm.add_hookspecs(hookspecs)
    packages: dict[str, str] = {}
    for modname in DEFAULT_PLUGINS:
        mod = importlib.import_module(modname)
        pm.register(mod, modname)
        packages[modname] = BUILTIN_PACKAGE
    if autoload is None:
        autoload = not os.environ.get(DISABLE_AUTOLOAD_ENV)
    if autoload:
        packages.update(_load_entry_points(pm))
    for plugin in extra_plugins:
        label = (
            plugin.__name__
            if isinstance(plugin, ModuleType)
            else f"{type(plugin).__module__}.{type(plugin).__qualname__}"
        )
        name = pm.register(plugin, name=label if pm.get_plugin(label) is None else None)
        if name is not None:
            packages[name] = _package_of(plugin)
    return pm, packages


def _load_entry_points(pm: pluggy.PluginManager) -> dict[str, str]:
    """Load every ``instructrl`` entry point; a failing import names the plugin and its package.

    (pluggy's ``load_setuptools_entrypoints`` would let the bare import error escape.)
    """
    packages = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "<unknown package>"
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginError(
                f"plugin '{ep.name}' from package '{dist}' failed to import ({ep.value}): {type(exc).__name__}: {exc}"
            ) from exc
        pm.register(plugin, name=ep.name)
        packages[ep.name] = dist
    return packages


_REGISTRY: Registry | None = None


def get_registry(*, refresh: bool = False) -> Registry:
    """The process-wide registry (built on first use)."""
    global _REGISTRY
    if _REGISTRY is None or refresh:
        pm, packages = make_plugin_manager()
        _REGISTRY = Registry(pm, packages)
    return _REGISTRY


def make_registry(extra_plugins: Iterable[Any] = (), *, autoload: bool | None = None) -> Registry:
    """A fresh registry (tests use this to add plugin objects without touching the global one)."""
    pm, packages = make_plugin_manager(extra_plugins, autoload=autoload)
    return Registry(pm, packages)
