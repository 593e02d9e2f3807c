"""The plugin registry: one pluggy manager, one ``register`` callback per kind, one lookup.

Built-in plugins (``instructrl.plugins.DEFAULT_PLUGINS``) load through the same hooks as
third-party packages, which are discovered through the entry-point group ``instructrl`` unless
``INSTRUCTRL_DISABLE_PLUGIN_AUTOLOAD`` is set; ``INSTRUCTRL_DISABLE_PLUGINS=name[,name]`` skips
named plugins (the names ``instructrl plugins`` lists). A plugin that fails to import, registers a
name twice, claims a recipe section, or does not implement its kind's protocol is *broken*: it is
left out, ``instructrl plugins`` lists it, and every other command stops with one line naming it
and the switch that skips it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

from . import hookspecs, protocols
from .errors import ConfigError, PluginError, did_you_mean, one_of
from .fields import check_keys, field_names, validate
from .types import Needs

if TYPE_CHECKING:
    from torch import Tensor
    from transformers import PreTrainedTokenizerBase

ENTRY_POINT_GROUP = "instructrl"
DISABLE_AUTOLOAD_ENV = "INSTRUCTRL_DISABLE_PLUGIN_AUTOLOAD"
DISABLE_ENV = "INSTRUCTRL_DISABLE_PLUGINS"
BUILTIN_PACKAGE = "instructrl"
LAUNCHER_COMMANDS = ("run", "plugins", "recipes")
"""Sub-commands of the launcher itself; a registered command may not take these names."""


@dataclass(frozen=True)
class Kind:
    """A component kind: its name, the hook that registers it, the recipe key that selects it and
    the protocol its components implement. ``instance`` kinds register an object, not a factory."""

    name: str
    hook: str
    recipe_key: str
    protocol: type
    instance: bool = False


KINDS: dict[str, Kind] = {
    k.name: k
    for k in [
        Kind("task", "register_tasks", "task.name", protocols.Task),
        Kind("policy", "register_policies", "policy.name", protocols.Policy),
        Kind("value_model", "register_value_models", "value.name", protocols.ValueModel),
        Kind("reward_model", "register_reward_models", "reward.name", protocols.RewardModel),
        Kind("advantage", "register_advantage_estimators", "advantage.name", protocols.AdvantageEstimator),
        Kind("objective", "register_objectives", "objective.name", protocols.Objective),
        Kind("kl_estimator", "register_kl_estimators", "kl.estimator", protocols.KLEstimator),
        Kind("kl_controller", "register_kl_controllers", "kl.controller", protocols.KLController),
        Kind("reward_transform", "register_reward_transforms", "reward_transforms[].name", protocols.RewardTransform),
        Kind("extra_loss", "register_extra_losses", "<name>.coef", protocols.ExtraLoss),
        Kind("logger", "register_loggers", "loggers[].name", protocols.Logger),
        Kind("stage", "register_stages", "stages[]", protocols.Stage, instance=True),
        Kind("command", "register_commands", "instructrl <command>", protocols.Command, instance=True),
    ]
}  # fmt: skip


@dataclass(frozen=True)
class ComponentSpec:
    """One registered component: ``factory`` builds it (for ``stage``/``command``: the object)."""

    kind: str
    name: str
    factory: Any
    config: type | None
    description: str
    package: str
    plugin: str
    needs: Needs = Needs()

    def as_dict(self) -> dict[str, str]:
        """``{kind, name, package, plugin, description}`` (the ``instructrl plugins --json`` row)."""
        return {
            "kind": self.kind,
            "name": self.name,
            "package": self.package,
            "plugin": self.plugin,
            "description": self.description,
        }


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin left out of the registry, and why."""

    plugin: str
    package: str
    error: str

    def message(self) -> str:
        return f"{self.error} (skip it with {DISABLE_ENV}={self.plugin})"


@dataclass
class BuildContext:
    """What a factory may need beyond its config. Fields a stage does not have are ``None``
    (docs/plugins.md lists which fields each kind receives).

    Attributes:
        registry: the registry (to build nested components, e.g. ``ensemble`` members).
        seed: the seed of the stage being built.
        stage: the stage's name; ``stage_dir``: where it writes (loggers write there).
        run_name: the run directory's name.
        paths: output model dirs of upstream stages, ``{"sft": ".../model"}``.
        task: the built Task.
        tokenizer: the policy's HF tokenizer.
        reward_model: the built reward model.
        score_demonstrations: ``() -> (N,)`` reward scores of the task's demonstrations.
        score_reference_samples: ``(n) -> (n,)`` reward scores of ``n`` reference-policy samples.
    """

    registry: Registry
    seed: int = 0
    stage: str = ""
    stage_dir: Path | None = None
    run_name: str = "run"
    paths: dict[str, str] = field(default_factory=dict)
    task: protocols.Task | None = None
    tokenizer: PreTrainedTokenizerBase | None = None
    reward_model: protocols.RewardModel | None = None
    score_demonstrations: Callable[[], Tensor] | None = None
    score_reference_samples: Callable[[int], Tensor] | None = None

    def resolve(self, value: str, key: str) -> str:
        """A path from a recipe value: ``@stage`` becomes that stage's output model dir."""
        if value.startswith("@"):
            if value[1:] not in self.paths:
                raise ConfigError(
                    f"{key}: '{value}' refers to a stage output this run does not produce (available: {one_of(self.paths)})"
                )
            return self.paths[value[1:]]
        return value


# --------------------------------------------------------------------------------------------
# Protocol conformance
# --------------------------------------------------------------------------------------------


def _members(proto: type) -> tuple[dict[str, inspect.Signature], list[str]]:
    """The methods (with signatures) and attributes a Protocol declares."""
    methods: dict[str, inspect.Signature] = {}
    attrs: list[str] = []
    for klass in reversed(proto.__mro__):
        if klass in (object, Protocol) or klass.__module__ == "typing":
            continue
        attrs += [a for a in vars(klass).get("__annotations__", {}) if not a.startswith("_")]
        for name, value in vars(klass).items():
            if isinstance(value, property):
                attrs.append(name)
            elif inspect.isfunction(value) and (name == "__call__" or not name.startswith("_")):
                methods[name] = inspect.signature(value)
    return methods, sorted(set(attrs))


def _signature_problem(want: inspect.Signature, impl: Callable[..., object]) -> str | None:
    """Why ``impl`` cannot be called the way the protocol's ``want`` is called (or ``None``)."""
    try:
        have = inspect.signature(impl)
    except (TypeError, ValueError):
        return None  # builtins without a signature: trust them
    wanted = [p for p in want.parameters.values() if p.name != "self"]
    params = list(have.parameters.values())
    var_pos = any(p.kind is p.VAR_POSITIONAL for p in params)
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    n_pos = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in wanted)
    if len(positional) < n_pos and not var_pos:
        return f"takes {len(positional)} positional argument(s), the caller passes {n_pos}"
    keywords = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for p in wanted:
        if p.kind is p.KEYWORD_ONLY and p.name not in keywords and not var_kw:
            return f"has no keyword argument '{p.name}'"
    passed = {p.name for p in wanted if p.kind is p.KEYWORD_ONLY}
    for i, p in enumerate(positional):
        if i >= n_pos and p.default is p.empty and p.name not in passed:
            return f"requires argument '{p.name}', which the caller never passes"
    for p in params:
        if p.kind is p.KEYWORD_ONLY and p.default is p.empty and p.name not in passed:
            return f"requires keyword argument '{p.name}', which the caller never passes"
    return None


def protocol_problem(obj: object, proto: type) -> str | None:
    """The first way ``obj`` fails to implement ``proto`` (a missing method or attribute, or
    parameters that do not match), or ``None``."""
    methods, attrs = _members(proto)
    for name, want in methods.items():
        impl = obj if name == "__call__" and callable(obj) else inspect.getattr_static(obj, name, None)
        if impl is None or (name == "__call__" and not callable(obj)):
            return f"missing method {name}{want}"
        bound = obj if name == "__call__" else getattr(obj, name)
        if not callable(bound):
            return f"'{name}' is not a method"
        problem = _signature_problem(want, bound)
        if problem:
            return f"method {name} {problem} (expected {name}{want})"
    for name in attrs:
        try:
            inspect.getattr_static(obj, name)
        except AttributeError:
            return f"missing attribute '{name}'"
    return None


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


def _first_line(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


class Registry:
    """Every registered component, by kind and name; plugins that could not be registered."""

    def __init__(
        self, pm: pluggy.PluginManager, packages: Mapping[str, str], broken: Iterable[BrokenPlugin] = ()
    ) -> None:
        self.pm = pm
        self._packages = dict(packages)  # plugin name -> providing package
        self._specs: dict[str, dict[str, ComponentSpec]] = {k: {} for k in KINDS}
        self.broken: list[BrokenPlugin] = list(broken)
        self.builds = 0
        """Components built so far (``--dry-run`` builds none)."""
        for kind in KINDS.values():
            self._collect(kind)
        self._check_top_level_keys()

    # -- collection ---------------------------------------------------------------------------
    def _collect(self, kind: Kind) -> None:
        caller = getattr(self.pm.hook, kind.hook)
        for impl in caller.get_hookimpls():  # registration order: built-ins first
            plugin_name = self.pm.get_name(impl.plugin) or repr(impl.plugin)
            package = self._packages.get(plugin_name, _package_of(impl.plugin))

            def register(
                name: str,
                factory: Any,
                *,
                config: type | None = None,
                description: str | None = None,
                needs: Needs | None = None,
                _pkg: str = package,
                _plugin: str = plugin_name,
                _kind: Kind = kind,
            ) -> None:
                desc = description or _first_line(factory)
                self._add(
                    ComponentSpec(_kind.name, name, factory, config, desc, _pkg, _plugin, needs or Needs())
                )

            try:
                impl.function(register=register)
            except PluginError as exc:
                self._break(plugin_name, package, str(exc))
            except Exception as exc:  # a plugin's own bug: name it
                self._break(
                    plugin_name,
                    package,
                    f"plugin '{plugin_name}' (package '{package}') failed in {kind.hook}: {exc}",
                )

    def _break(self, plugin: str, package: str, error: str) -> None:
        self.broken.append(BrokenPlugin(plugin, package, error))
        for specs in self._specs.values():
            for name in [n for n, s in specs.items() if s.plugin == plugin]:
                del specs[name]

    def _add(self, spec: ComponentSpec) -> None:
        where = f"package '{spec.package}' (plugin {spec.plugin})"
        if not spec.name or not isinstance(spec.name, str) or not spec.name.isidentifier():
            raise PluginError(f"{where} registered a {spec.kind} with an invalid name {spec.name!r}")
        if spec.needs is not None and not isinstance(spec.needs, Needs):
            raise PluginError(f"{where}: {spec.kind} '{spec.name}': needs= must be an instructrl Needs")
        existing = self._specs[spec.kind].get(spec.name)
        if existing is not None:
            raise PluginError(
                f"{spec.kind} '{spec.name}' is registered twice: by package '{existing.package}' "
                f"(plugin {existing.plugin}) and by {where}"
            )
        if spec.kind == "command" and spec.name in LAUNCHER_COMMANDS:
            raise PluginError(f"command '{spec.name}' of {where} clashes with the launcher's own sub-command")
        if KINDS[spec.kind].instance:
            self._check(spec.factory, spec)
            if spec.kind == "stage":
                for section, cls in spec.factory.sections.items():
                    if not isinstance(cls, type):
                        raise PluginError(
                            f"{where}: stage '{spec.name}': section '{section}' needs a dataclass"
                        )
        self._specs[spec.kind][spec.name] = spec

    def _check(self, obj: object, spec: ComponentSpec) -> None:
        wanted = [KINDS[spec.kind].protocol] + ([protocols.Stateful] if spec.needs.stateful else [])
        for proto in wanted:
            problem = protocol_problem(obj, proto)
            if problem is not None:
                raise PluginError(
                    f"{spec.kind} '{spec.name}' (plugin {spec.plugin}, package '{spec.package}') does not "
                    f"implement {proto.__name__}: {problem}"
                )

    def _check_top_level_keys(self) -> None:
        """Stage sections and extra-loss blocks are top-level recipe keys: each has one owner."""
        from .config.schema import RecipeSchema

        owners: dict[str, str] = {k: "the core recipe schema" for k in field_names(RecipeSchema)}
        claims = [(sec, s) for s in self._specs["stage"].values() for sec in s.factory.sections]
        claims += [(s.name, s) for s in self._specs["extra_loss"].values()]
        for key, spec in claims:
            mine = f"{spec.kind} '{spec.name}' of package '{spec.package}'"
            if key in owners and owners[key] != mine:
                self._break(
                    spec.plugin,
                    spec.package,
                    f"recipe section '{key}' is claimed twice: by {owners[key]} and by {mine}",
                )
            else:
                owners[key] = mine

    def check_healthy(self) -> None:
        """A :class:`PluginError` naming the first broken plugin and the switch that skips it."""
        if self.broken:
            raise PluginError(self.broken[0].message())

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

    def needs(self, kind: str, name: str) -> Needs:
        """What ``kind``/``name`` declared it needs (read without building it)."""
        return self.get(kind, name).needs

    def stages(self) -> dict[str, protocols.Stage]:
        """The registered stage objects by name."""
        return {n: s.factory for n, s in self._specs["stage"].items()}

    def config_for_block(self, kind: str, name: str, block: Mapping[str, Any], path: str) -> object:
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

    def build(self, kind: str, name: str, config: object, ctx: BuildContext) -> Any:
        """Call the component's factory with its validated config and ``ctx``; check the result
        against the kind's protocol (and :class:`~instructrl.core.protocols.Stateful` if declared)."""
        spec = self.get(kind, name)
        if KINDS[kind].instance:
            return spec.factory
        self.builds += 1
        obj = spec.factory(config, ctx)
        self._check(obj, spec)
        return obj


def _package_of(plugin: object) -> str:
    module = plugin if isinstance(plugin, ModuleType) else inspect.getmodule(plugin)
    name = getattr(module, "__name__", "") or ""
    top = name.split(".")[0]
    if top == BUILTIN_PACKAGE:
        return BUILTIN_PACKAGE
    dists = importlib.metadata.packages_distributions().get(top)
    return dists[0] if dists else (top or "<unknown>")


def disabled_plugins() -> set[str]:
    """Plugin names listed in ``INSTRUCTRL_DISABLE_PLUGINS``."""
    return {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}


def make_plugin_manager(
    extra_plugins: Iterable[object] = (), *, autoload: bool | None = None
) -> tuple[pluggy.PluginManager, dict[str, str], list[BrokenPlugin]]:
    """A plugin manager with the hookspecs, the default plugins, entry-point plugins (unless
    disabled) and ``extra_plugins`` (modules or objects with hook implementations)."""
    from instructrl.plugins import DEFAULT_PLUGINS

    pm = pluggy.PluginManager("instructrl")
    pm.add_hookspecs(hookspecs)
    skip = disabled_plugins()
    for name in skip:
        pm.set_blocked(name)
    packages: dict[str, str] = {}
    broken: list[BrokenPlugin] = []
    for modname in DEFAULT_PLUGINS:
        if modname not in skip:
            pm.register(importlib.import_module(modname), modname)
            packages[modname] = BUILTIN_PACKAGE
    if autoload is None:
        autoload = not os.environ.get(DISABLE_AUTOLOAD_ENV)
    if autoload:
        packages.update(_load_entry_points(pm, broken))
    for plugin in extra_plugins:
        label = (
            plugin.__name__
            if isinstance(plugin, ModuleType)
            else f"{type(plugin).__module__}.{type(plugin).__qualname__}"
        )
        try:
            name = pm.register(plugin, name=label if pm.get_plugin(label) is None else None)
        except pluggy.PluginValidationError as exc:
            broken.append(BrokenPlugin(label, _package_of(plugin), f"plugin '{label}' is invalid: {exc}"))
            continue
        if name is not None:
            packages[name] = _package_of(plugin)
    return pm, packages, broken


def _load_entry_points(pm: pluggy.PluginManager, broken: list[BrokenPlugin]) -> dict[str, str]:
    """Load every ``instructrl`` entry point; failures are recorded as broken plugins naming the
    plugin and its package, and two packages using one entry-point name break both."""
    packages: dict[str, str] = {}
    eps = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    dists: dict[str, set[str]] = {}
    for ep in eps:
        dists.setdefault(ep.name, set()).add(ep.dist.name if ep.dist is not None else "<unknown package>")
    for ep in eps:
        dist = ep.dist.name if ep.dist is not None else "<unknown package>"
        if pm.is_blocked(ep.name) or ep.name in packages:
            continue
        if len(dists[ep.name]) > 1:
            names = " and ".join(f"'{d}'" for d in sorted(dists[ep.name]))
            broken.append(
                BrokenPlugin(ep.name, dist, f"entry point '{ep.name}' is provided by two packages: {names}")
            )
            packages[ep.name] = dist
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:
            broken.append(
                BrokenPlugin(
                    ep.name,
                    dist,
                    f"plugin '{ep.name}' from package '{dist}' failed to load ({ep.value}): "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                )
            )
            continue
        packages[ep.name] = dist
    return packages


_REGISTRY: Registry | None = None


def get_registry(*, refresh: bool = False, strict: bool = True) -> Registry:
    """The process-wide registry (built on first use). ``strict``: a broken plugin is an error."""
    global _REGISTRY
    if _REGISTRY is None or refresh:
        pm, packages, broken = make_plugin_manager()
        _REGISTRY = Registry(pm, packages, broken)
    if strict:
        _REGISTRY.check_healthy()
    return _REGISTRY


def make_registry(
    extra_plugins: Iterable[object] = (), *, autoload: bool | None = None, strict: bool = True
) -> Registry:
    """A fresh registry (tests use this to add plugin objects without touching the global one)."""
    pm, packages, broken = make_plugin_manager(extra_plugins, autoload=autoload)
    registry = Registry(pm, packages, broken)
    if strict:
        registry.check_healthy()
    return registry
