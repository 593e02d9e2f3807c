"""Loading recipes: bundled names and paths, ``extends`` chains, the smoke overlay, ``key=value``
overrides and interpolation. Nothing is validated here (see :mod:`.validate`)."""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
from collections.abc import Sequence
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import ConfigError, did_you_mean, one_of
from .schema import RecipeSchema

SMOKE_OVERLAY = "_smoke"
DEFAULTS = "_defaults"


def bundled_recipes() -> dict[str, Path]:
    """``{name: path}`` of the recipes shipped with the package (overlays excluded)."""
    root = importlib.resources.files("instructrl.recipes")
    out = {}
    for entry in root.iterdir():
        name = entry.name
        if name.endswith(".yaml") and not name.startswith("_"):
            out[name[: -len(".yaml")]] = Path(str(entry))
    return dict(sorted(out.items()))


def _bundled_file(name: str) -> Path:
    return Path(str(importlib.resources.files("instructrl.recipes") / f"{name}.yaml"))


def recipe_path(recipe: str | os.PathLike[str], relative_to: Path | None = None) -> Path:
    """The file of a bundled recipe name or a path; :class:`ConfigError` when neither exists."""
    text = str(recipe)
    candidates = []
    if relative_to is not None and not os.path.isabs(text):
        candidates.append(relative_to / text)
    candidates.append(Path(text))
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
        if candidate.suffix == "" and candidate.with_suffix(".yaml").is_file() and os.sep in text:
            return candidate.with_suffix(".yaml").resolve()
    bundled = bundled_recipes()
    if text in bundled:
        return bundled[text]
    names = list(bundled)
    raise ConfigError(
        f"recipe '{text}' not found: not a file and not a bundled recipe{did_you_mean(text, names)} (bundled: {one_of(names)})"
    )


def load_yaml(path: Path) -> DictConfig:
    """Load one YAML file as a DictConfig; malformed YAML is a one-line error with the line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read recipe ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    try:
        return OmegaConf.create(data)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {str(exc).splitlines()[0]}") from None


def _load_chain(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    if path in seen:
        chain = " → ".join(str(p.name) for p in (*seen, path))
        raise ConfigError(f"{path}: 'extends' forms a cycle ({chain})")
    cfg = load_yaml(path)
    parent = cfg.get("extends")
    if parent:
        base = _load_chain(recipe_path(str(parent), relative_to=path.parent), (*seen, path))
        cfg = OmegaConf.merge(base, cfg)
    return cfg


def _quote_reserved(item: str) -> str:
    """``key=@stage`` as a string: YAML reserves ``@`` and backquote at the start of a plain value."""
    key, _, value = item.partition("=")
    if value[:1] in ("@", "`"):
        return f"{key}={json.dumps(value)}"
    return item


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """``key=value`` strings (OmegaConf dotlist; values typed as YAML types them)."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}': expected key=value (e.g. kl.coef=0.05)")
    try:
        return OmegaConf.from_dotlist([_quote_reserved(item) for item in overrides])
    except OmegaConfBaseException as exc:
        raise ConfigError(f"override: {str(exc).splitlines()[0]}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override: malformed value ({getattr(exc, 'problem', exc)})") from None


def compose(
    recipe: str | os.PathLike[str], overrides: Sequence[str] = (), *, smoke: bool = False
) -> DictConfig:
    """Schema defaults ← ``_defaults.yaml`` ← recipe (with its ``extends`` chain) ← smoke overlay ←
    overrides, interpolated."""
    defaults = OmegaConf.create(dataclasses.asdict(RecipeSchema()))
    path = recipe_path(recipe)
    cfg = OmegaConf.merge(defaults, load_yaml(_bundled_file(DEFAULTS)), _load_chain(path))
    if smoke:
        cfg = OmegaConf.merge(cfg, load_yaml(_bundled_file(SMOKE_OVERLAY)))
        own = cfg.get("smoke") or {}
        cfg = OmegaConf.merge(cfg, own)
    cfg = OmegaConf.merge(cfg, parse_overrides(overrides))
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{getattr(exc, 'full_key', '') or path}: {str(exc).splitlines()[0]}") from None
    out = OmegaConf.create(resolved)
    out["extends"] = str(path)  # record where the recipe came from
    return out
