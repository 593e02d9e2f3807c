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

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from . import protocols
from .discovery import BrokenPlugin, make_plugin_manager, package_of, protocol_problem
from .errors import ConfigError, PluginError, did_you_mean, one_of
from .fields import check_keys, field_names, validate
from .types import Needs

if TYPE_CHECKING:
    from torch import Tensor
    from transformers import PreTrainedTokenizerBase

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
        return {k: getattr(self, k) for k in ("kind", "name", "package", "plugin", "description")}


@dataclass
class BuildContext:
    """What a factory may need beyond its config. Fields a stage does not have are ``None``
    (docs/plugins.md lists which fields each kind receives)."""

    registry: Registry  # the registry (to build nested components, e.g. ``ensemble`` members).
    seed: int = 0  # the seed of the stage being built.
    stage: str = ""  # the stage's name.
    stage_dir: Path | None = None  # where the stage writes (loggers write there).
    run_name: str = "run"  # the run directory's name.
    # output model dirs of upstream stages, ``{"sft": ".../model"}``.
    paths: dict[str, str] = field(default_factory=dict)
    task: protocols.Task | None = None  # the built Task.
    tokenizer: PreTrainedTokenizerBase | None = None  # the policy's HF tokenizer.
    reward_model: protocols.RewardModel | None = None  # the built reward model.
    # ``() -> (N,)`` reward scores of the task's demonstrations.
    score_demonstrations: Callable[[], Tensor] | None = None
    # ``(n) -> (n,)`` reward scores of ``n`` reference-policy samples.
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

    def _collect(self, kind: Kind) -> None:
        caller = getattr(self.pm.hook, kind.hook)
        for impl in caller.get_hookimpls():  # registration order: built-ins first
            plugin_name = self.pm.get_name(impl.plugin) or repr(impl.plugin)
            if any(b.plugin == plugin_name for b in self.broken):
                continue  # a broken plugin registers nothing more
            package = self._packages.get(plugin_name, package_of(impl.plugin))

            def register(
                name: str, factory: Any, *, config: type | None = None, description: str | None = None,
                needs: Needs | None = None, _pkg: str = package, _plugin: str = plugin_name, _kind: Kind = kind,
            ) -> None:  # fmt: skip
                desc = description or _first_line(factory)
                self._add(
                    ComponentSpec(_kind.name, name, factory, config, desc, _pkg, _plugin, needs or Needs())
                )

            try:
                impl.function(register=register)
            except PluginError as exc:
                self._break(plugin_name, package, str(exc))
            except Exception as exc:  # a plugin's own bug: name it
                error = f"plugin '{plugin_name}' (package '{package}') failed in {kind.hook}: {exc}"
                self._break(plugin_name, package, error)

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
            for section, cls in spec.factory.sections.items() if spec.kind == "stage" else ():
                if not isinstance(cls, type):
                    raise PluginError(f"{where}: stage '{spec.name}': section '{section}' needs a dataclass")
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
                self._break(spec.plugin, spec.package, f"recipe section '{key}' is claimed twice: by {owners[key]} and by {mine}")  # fmt: skip
            else:
                owners[key] = mine

    def check_healthy(self) -> None:
        """A :class:`PluginError` naming the first broken plugin and the switch that skips it."""
        if self.broken:
            raise PluginError(self.broken[0].message())

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
