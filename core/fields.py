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


def param(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None) -> Any:
    """A dataclass field with a one-line ``help`` (shown by ``instructrl plugins --config`` and the
    recipe reference). Use ``factory`` for mutable defaults."""
    meta = {"help": help}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


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
