"""Typed configs: the ``param`` helper and validation of a recipe block against a dataclass.

Validation uses OmegaConf structured configs (types, ``Literal`` choices, missing values) and the
dataclass's ``__post_init__`` (ranges and settings that cannot go together); every failure becomes a
one-line :class:`~instructrl.core.errors.ConfigError` naming the full key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from .errors import ConfigError, did_you_mean

T = TypeVar("T")


MODEL_PATH_ROLES = ("weights", "reference", "input")


def param(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Any = None,
    model_path: str | None = None,
) -> Any:
    """A dataclass field with a one-line ``help`` (shown in the recipe reference). Use ``factory``
    for mutable defaults.

    ``model_path`` marks a field holding a model directory (or an ``@stage`` reference):
    ``"weights"`` (the component's own weights), ``"reference"`` (a policy's KL reference) or
    ``"input"`` (any other model a stage reads). The launcher checks such paths before anything
    runs and orders stages by the ``@stage`` references in them.
    """
    if model_path is not None and model_path not in MODEL_PATH_ROLES:
        raise ValueError(f"model_path must be one of {', '.join(MODEL_PATH_ROLES)} (got {model_path!r})")
    meta = {"help": help, "model_path": model_path}
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
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), data)
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
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        # __post_init__ messages name the field first ("coef must be >= 0"); prefix the block path.
        raise ConfigError(f"{path}.{msg}" if path else msg) from None


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


def unit_interval(obj: object, *names: str) -> None:
    """``__post_init__`` helper: each named field is in [0, 1)."""
    for name in names:
        value = getattr(obj, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1) (got {value})")
