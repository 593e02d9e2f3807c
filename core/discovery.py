"""Finding and loading plugins (built-in modules, entry points, ``INSTRUCTRL_DISABLE_PLUGINS``) and
checking that what a plugin registers or builds implements its kind's protocol."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import pluggy

from . import hookspecs
from .errors import did_you_mean

ENTRY_POINT_GROUP = "instructrl"
DISABLE_AUTOLOAD_ENV = "INSTRUCTRL_DISABLE_PLUGIN_AUTOLOAD"
DISABLE_ENV = "INSTRUCTRL_DISABLE_PLUGINS"
BUILTIN_PACKAGE = "instructrl"


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin left out of the registry, and why."""

    plugin: str
    package: str
    error: str

    def message(self) -> str:
        if self.error.startswith(DISABLE_ENV):
            return self.error
        return f"{self.error} (skip it with {DISABLE_ENV}={self.plugin})"


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


@functools.cache
def _distributions() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


def package_of(plugin: object) -> str:
    module = plugin if isinstance(plugin, ModuleType) else inspect.getmodule(plugin)
    name = getattr(module, "__name__", "") or ""
    top = name.split(".")[0]
    if top == BUILTIN_PACKAGE:
        return BUILTIN_PACKAGE
    dists = _distributions().get(top)
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
            broken.append(BrokenPlugin(label, package_of(plugin), f"plugin '{label}' is invalid: {exc}"))
            continue
        if name is not None:
            packages[name] = package_of(plugin)
    unknown = skip - set(DEFAULT_PLUGINS)
    known = (
        {*DEFAULT_PLUGINS, *(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))}
        if unknown
        else set()
    )
    for name in sorted(unknown - known):  # a typo would silently disable nothing
        hint = did_you_mean(name, known)
        broken.append(BrokenPlugin(name, "-", f"{DISABLE_ENV}: no plugin named '{name}'{hint}"))
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
