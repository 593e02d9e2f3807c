"""Typed configs: the ``param`` helper and validation of a recipe block against a dataclass.

Validation uses OmegaConf structured configs (types, ``Literal`` choices, missing values) and the
dataclass's ``__post_init__`` (ranges and settings that cannot go together); every failure becomes a
one-line :class:`~instructrl.core.errors.ConfigError` naming the full key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from .errors import ConfigError, DataError, did_you_mean

T = TypeVar("T")


MODEL_PATH_ROLES = ("weights", "reference", "input")


def param(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Any = None,
    model_path: str | None = None,
    resume_safe: bool = False,
) -> Any:
    """A dataclass field with a one-line ``help`` (shown in the recipe reference). Use ``factory``
    for mutable defaults.

    ``model_path`` marks a field holding a model directory (or an ``@stage`` reference):
    ``"weights"`` (the component's own weights), ``"reference"`` (a policy's KL reference) or
    ``"input"`` (any other model a stage reads). The launcher checks such paths before anything
    runs and orders stages by the ``@stage`` references in them. ``resume_safe`` marks a stage
    section's key that a ``--resume`` may change (``rl.iterations`` extends a run).
    """
    if model_path is not None and model_path not in MODEL_PATH_ROLES:
        raise ValueError(f"model_path must be one of {', '.join(MODEL_PATH_ROLES)} (got {model_path!r})")
    meta = {"help": help, "model_path": model_path, "resume_safe": resume_safe}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def model_path_fields(cls: type | None) -> dict[str, str]:
    """``{field: role}`` of the fields of a config dataclass marked with ``model_path``."""
    if cls is None:
        return {}
    return {f.name: f.metadata["model_path"] for f in dataclasses.fields(cls) if f.metadata.get("model_path")}


def field_for_role(cls: type | None, role: str) -> str | None:
    """The name of the field marked ``model_path=role`` (the first one), or ``None``."""
    return next((f for f, r in model_path_fields(cls).items() if r == role), None)


def field_help(cls: type) -> dict[str, str]:
    """``{field name: help}`` of a config dataclass."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def field_names(cls: type | None) -> list[str]:
    """Field names of a config dataclass (empty for ``None``)."""
    return [] if cls is None else [f.name for f in dataclasses.fields(cls)]


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def check_keys(
    data: Mapping[str, Any], valid: Iterable[str], path: str, what: str, ignorable: Iterable[str] = ()
) -> list[str]:
    """Raise :class:`ConfigError` for a key not in ``valid`` (with a "did you mean").

    Keys in ``ignorable`` are allowed and returned (they belong to a sibling component that is not
    selected, e.g. ``kl.target`` under the ``fixed`` controller), so a sweep over the selector works.
    """
    valid = list(valid)
    ignorable = set(ignorable)
    ignored = []
    for key in data:
        if key in valid:
            continue
        if key in ignorable:
            ignored.append(key)
            continue
        hint = did_you_mean(str(key), valid)
        listing = ", ".join(sorted(valid)) or "(no keys)"
        raise ConfigError(f"{_join(path, str(key))}: unknown key for {what}{hint} (valid keys: {listing})")
    return ignored


def validate(cls: type[T], data: Mapping[str, Any] | DictConfig | None, path: str) -> T:
    """Build an instance of the config dataclass ``cls`` from ``data``; one-line errors.

    Args:
        cls: the config dataclass.
        data: the recipe block (keys must all be fields of ``cls``; check with :func:`check_keys`
            first to get "did you mean" hints for unknown keys).
        path: the block's dotted path in the recipe, used in error messages.
    """
    if data is None:
        data = {}
    if not isinstance(data, DictConfig):
        data = OmegaConf.create(dict(data))
    check_keys(data, field_names(cls), path, f"'{path or cls.__name__}'")
    hints = _type_hints(cls)
    for key, value in data.items():
        hint = hints.get(str(key))
        if hint is None:
            continue
        if isinstance(value, (DictConfig, ListConfig)) and not _container_ok(hint, value):
            what = "a mapping" if isinstance(value, DictConfig) else "a list"
            raise ConfigError(
                f"{_join(path, str(key))}: expected {type_name(hint)}, got {what} ({to_plain(value)!r})"
            )
        if not isinstance(value, (DictConfig, ListConfig)) and not _scalar_ok(hint, value):
            raise ConfigError(f"{_join(path, str(key))}: expected {type_name(hint)}, got {value!r}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), data)
        for key in data:
            _check_value(_join(path, str(key)), str(key), merged.get(key))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except MissingMandatoryValue as exc:
        key = _join(path, str(exc.full_key))
        raise ConfigError(
            f"{key}: a value is required ({field_help(cls).get(str(exc.full_key), '')})".rstrip(" ()")
        ) from None
    except OmegaConfBaseException as exc:
        msg = str(exc).splitlines()[0]
        key = _join(path, str(getattr(exc, "full_key", "") or ""))
        raise ConfigError(f"{key}: {msg}") from None
    except DataError as exc:  # a data file a field names (read at validation): keep the class
        raise DataError(f"{path}.{exc}" if path else str(exc)) from None
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        # __post_init__ messages name the field first ("coef must be >= 0"); prefix the block path.
        raise ConfigError(f"{path}.{msg}" if path else msg) from None


SEED_RANGE = (0, 2**32 - 1)


def check_seed(value: int, key: str) -> None:
    """A seed is an integer in [0, 2**32 - 1] (what numpy and Lightning accept)."""
    lo, hi = SEED_RANGE
    if not lo <= value <= hi:
        raise ConfigError(f"{key}: a seed must be in [{lo}, {hi}] (got {value})")


def _check_value(key: str, name: str, value: Any) -> None:
    """Rules for every field of every config dataclass: numbers are finite (no nan or inf) and a
    field named ``seed`` holds a valid seed."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number (got {value})")
    if name == "seed" and isinstance(value, int) and not isinstance(value, bool):
        check_seed(value, key)


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: no hint, OmegaConf still types the field
        return {}


def _container_ok(hint: Any, value: DictConfig | ListConfig) -> bool:
    """Whether a field annotated ``hint`` may hold a mapping (``DictConfig``) or list."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_container_ok(a, value) for a in typing.get_args(hint))
    if isinstance(value, DictConfig):
        return origin in (dict, Mapping) or hint is dict or dataclasses.is_dataclass(hint)
    return origin in (list, tuple, Sequence) or hint in (list, tuple)


def _scalar_ok(hint: Any, value: Any) -> bool:
    """Whether a field annotated ``hint`` may hold the scalar ``value`` (OmegaConf then converts
    and range-checks it): not when the field only takes a list or a mapping."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_scalar_ok(a, value) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if value is None:
        return True  # OmegaConf says whether the field is optional
    if hint is bool:  # OmegaConf would read any number as a bool (3 → true)
        return isinstance(value, (bool, str))
    return not (
        origin in (list, tuple, Sequence, dict, Mapping)
        or hint in (list, tuple, dict)
        or dataclasses.is_dataclass(hint)
    )


_TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    type(None): "null",
}


def type_name(hint: Any) -> str:
    """An annotation as the recipe values it accepts: ``int | None`` → ``"an integer or null"``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parts = list(dict.fromkeys(p for p in (type_name(a) for a in args) if p))
        return ", ".join(parts[:-1]) + " or " + parts[-1] if len(parts) > 1 else "".join(parts)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, Sequence):
        inner = (type_name(args[0]) if args else "").removeprefix("an ").removeprefix("a ")
        return f"a list of {inner}s" if inner and " " not in inner else "a list"
    if origin in (dict, Mapping) or hint is dict or dataclasses.is_dataclass(hint):
        return "a mapping"
    return _TYPE_NAMES.get(hint, "")


def to_plain(cfg: Any) -> Any:
    """A config dataclass, DictConfig or mapping as plain Python containers."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def positive(obj: object, *names: str) -> None:
    """``__post_init__`` helper: each named field is > 0 (one-line ValueError naming it)."""
    for name in names:
        value = getattr(obj, name)
        if value is None or value <= 0:
            raise ValueError(f"{name} must be > 0 (got {value})")


def non_negative(obj: object, *names: str) -> None:
    """``__post_init__`` helper: each named field is >= 0."""
    for name in names:
        value = getattr(obj, name)
        if value is None or not value >= 0:
            raise ValueError(f"{name} must be >= 0 (got {value})")


def unit_interval(obj: object, *names: str) -> None:
    """``__post_init__`` helper: each named field is in [0, 1)."""
    for name in names:
        value = getattr(obj, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1) (got {value})")
