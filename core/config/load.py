"""Loading recipes: bundled names and paths, ``extends`` chains, the smoke overlay, ``key=value``
overrides and interpolation. Nothing is validated here (see :mod:`.validate`)."""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..errors import ConfigError, did_you_mean, one_of
from .schema import RecipeSchema

SMOKE_OVERLAY = "_smoke"
DEFAULTS = "_defaults"


_SWEEP_BLOCK = re.compile(r"^sweep:", re.MULTILINE)


def _bundled(sweeps: bool) -> dict[str, Path]:
    root = importlib.resources.files("instructrl.recipes")
    out = {}
    for entry in root.iterdir():
        name = entry.name
        if name.endswith(".yaml") and not name.startswith("_"):
            if bool(_SWEEP_BLOCK.search(entry.read_text())) == sweeps:
                out[name[: -len(".yaml")]] = Path(str(entry))
    return dict(sorted(out.items()))


def bundled_recipes() -> dict[str, Path]:
    """``{name: path}`` of the recipes shipped with the package (overlays and sweeps excluded)."""
    return _bundled(sweeps=False)


def bundled_sweeps() -> dict[str, Path]:
    """``{name: path}`` of the sweep files shipped with the package (a top-level ``sweep:`` block;
    ``instructrl sweep NAME`` runs one)."""
    return _bundled(sweeps=True)


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
    if text in bundled_sweeps():
        raise ConfigError(f"'{text}' is a bundled sweep, not a recipe; run it with `instructrl sweep {text}`")
    names = list(bundled)
    raise ConfigError(
        f"recipe '{text}' not found: not a file and not a bundled recipe{did_you_mean(text, names)} (bundled: {one_of(names)})"
    )


def load_yaml(path: Path) -> DictConfig:
    """Load one YAML file as a DictConfig; malformed YAML is a one-line error with the line.

    A recipe is a UTF-8 YAML mapping; an empty file (or one with only comments) is an error, not
    "every default" (write ``{}`` or ``extends: <recipe>`` for that)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read recipe ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); a recipe is a UTF-8 YAML file"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    except (ValueError, TypeError, RecursionError) as exc:  # e.g. an out-of-range timestamp
        raise ConfigError(f"{path}: malformed YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        raise ConfigError(
            f"{path}: recipe is empty (write keys, e.g. 'extends: ppo', or '{{}}' for every default)"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    try:
        return OmegaConf.create(data)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        where = f"{path}: {key}:" if key else f"{path}:"
        raise ConfigError(f"{where} {str(exc).splitlines()[0].strip()}") from None


def _load_chain(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    if path in seen:
        chain = " → ".join(str(p.name) for p in (*seen, path))
        raise ConfigError(f"{path}: 'extends' forms a cycle ({chain})")
    cfg = load_yaml(path)
    parent = cfg.get("extends")
    if parent:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: extends: expected a recipe name or path, got {parent!r}")
        try:
            parent_path = recipe_path(parent, relative_to=path.parent)
        except ConfigError as exc:
            raise ConfigError(f"{path}: extends: {exc}") from None
        base = _load_chain(parent_path, (*seen, path))
        cfg = merge(base, cfg, what=str(path))
    return cfg


def _kind(value: object) -> str:
    if isinstance(value, (ListConfig, list)):
        return "a list"
    if isinstance(value, (DictConfig, dict)):
        return "a mapping"
    return f"the value {value!r}"


def _conflict(base: object, over: object, prefix: str = "") -> tuple[str, object, object] | None:
    """The first key where ``over`` puts a list on a mapping or a mapping on a list of ``base``."""
    if not isinstance(base, DictConfig) or not isinstance(over, DictConfig):
        return None
    for key in over:
        if key not in base:
            continue
        b, o = base._get_node(key), over._get_node(key)  # nodes: no interpolation is resolved
        name = f"{prefix}{key}"
        if isinstance(b, ListConfig) != isinstance(o, ListConfig) and all(
            isinstance(x, (ListConfig, DictConfig)) for x in (b, o)
        ):
            return name, b, o
        found = _conflict(b, o, f"{name}.")
        if found is not None:
            return found
    return None


def merge(*cfgs: DictConfig, what: str) -> DictConfig:
    """``OmegaConf.merge``; a list given where a mapping is (or the reverse) is a one-line
    ConfigError naming the key and ``what`` supplied it (a recipe file, ``override``)."""
    try:
        return OmegaConf.merge(*cfgs)  # type: ignore[return-value]
    except (OmegaConfBaseException, TypeError, ValueError) as exc:
        merged = cfgs[0]
        for over in cfgs[1:]:
            found = _conflict(merged, over)
            if found is not None:
                key, b, o = found
                hint = (
                    f"set the whole list, e.g. {key}=[...]"
                    if isinstance(b, ListConfig)
                    else f"set its keys, e.g. {key}.<key>=..."
                )
                raise ConfigError(f"{key}: is {_kind(b)}, but {what} gives {_kind(o)} ({hint})") from None
            try:
                merged = OmegaConf.merge(merged, over)  # type: ignore[assignment]
            except (OmegaConfBaseException, TypeError, ValueError):
                break
        raise ConfigError(f"{what}: cannot merge: {str(exc).splitlines()[0]}") from None


def _missing(tree: object, prefix: str = "") -> str | None:
    """The dotted key of the first OmegaConf missing value (``???``) left in a resolved tree."""
    if tree == "???":
        return prefix or "recipe"
    if isinstance(tree, dict):
        items = ((f"{prefix}.{k}" if prefix else str(k), v) for k, v in tree.items())
    elif isinstance(tree, list):
        items = ((f"{prefix}[{i}]", v) for i, v in enumerate(tree))
    else:
        return None
    return next((m for key, v in items if (m := _missing(v, key)) is not None), None)


def _quote_reserved(item: str) -> str:
    """``key=@stage`` as a string: YAML reserves ``@`` and backquote at the start of a plain value."""
    key, _, value = item.partition("=")
    if value[:1] in ("@", "`"):
        return f"{key}={json.dumps(value)}"
    return item


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """``key=value`` strings (OmegaConf dotlist; values typed as YAML types them)."""
    items = list(overrides)
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}': expected key=value (e.g. kl.coef=0.05)")
    try:
        return _dotlist(items)
    except ConfigError:  # name the override: the first that fails alone, or with those before it
        for i, item in enumerate(items):
            _dotlist([item], f"'{item}'")
            _dotlist(items[: i + 1], f"'{item}' (with the overrides before it)")
        raise


def _dotlist(items: Sequence[str], label: str = "") -> DictConfig:
    """``OmegaConf.from_dotlist``; a one-line ConfigError naming the override ``label``."""
    where = f"override {label}" if label else "override"
    try:
        return OmegaConf.from_dotlist([_quote_reserved(item) for item in items])
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{where}: {str(exc).splitlines()[0]}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: malformed value ({getattr(exc, 'problem', exc)})") from None
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise ConfigError(f"{where}: cannot apply ({exc})") from None


def compose(
    recipe: str | os.PathLike[str], overrides: Sequence[str] = (), *, smoke: bool = False
) -> DictConfig:
    """Schema defaults ← ``_defaults.yaml`` ← recipe (with its ``extends`` chain) ← smoke overlay ←
    overrides, interpolated."""
    defaults = OmegaConf.create(dataclasses.asdict(RecipeSchema()))
    path = recipe_path(recipe)
    cfg = merge(defaults, load_yaml(_bundled_file(DEFAULTS)), what="the defaults")
    chain = _load_chain(path)
    if "sweep" in chain:
        raise ConfigError(
            f"{path}: a sweep file (it has a sweep: block); run it with `instructrl sweep {recipe}`"
        )
    cfg = merge(cfg, chain, what=str(path))
    if smoke:
        cfg = merge(cfg, load_yaml(_bundled_file(SMOKE_OVERLAY)), what="the smoke overlay")
        own = cfg.get("smoke") or {}
        if not isinstance(own, (DictConfig, dict)):
            raise ConfigError(f"smoke: expected a mapping of keys applied under --smoke, got {own!r}")
        cfg = merge(cfg, own, what="the recipe's smoke block")
    for item in overrides:  # parsed and merged one by one, so an error names its override
        if item.split("=", 1)[0].split(".")[0] == "extends":
            raise ConfigError(
                f"override '{item}': 'extends' is read before overrides apply; "
                "make it the recipe (instructrl run RECIPE) or write it in the recipe file"
            )
        cfg = merge(cfg, parse_overrides([item]), what=f"override '{item}'")
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except (OmegaConfBaseException, RecursionError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{getattr(exc, 'full_key', '') or path}: {msg}") from None
    missing = _missing(resolved)
    if missing is not None:
        raise ConfigError(f"{missing}: no value ('???' marks a value to fill in: {missing}=...)")
    out = OmegaConf.create(resolved)
    out["extends"] = str(path)  # record where the recipe came from
    return out
