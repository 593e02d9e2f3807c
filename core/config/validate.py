"""Validation of a composed recipe before anything is built: every key against the schema, each
stage's sections and each selected component's config dataclass; the derived settings (samples per
prompt, whether a value model or logits are needed) computed once from what components declared.
"""

from __future__ import annotations

import inspect
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..errors import ConfigError, did_you_mean, one_of
from ..fields import check_keys, check_seed, field_names, to_plain, type_name, validate
from ..precision import resolve_precision
from ..registry import Registry
from .load import compose
from .schema import LIST_SLOTS, SLOTS, STAGE_OWNED_TRAINER_KEYS, RecipeSchema, Slot


@dataclass(frozen=True)
class Choice:
    """A selected component: kind, name, validated config, and the recipe path of its block."""

    kind: str
    name: str
    config: Any
    path: str


@dataclass(frozen=True)
class Derived:
    """Settings that follow from what the selected components declared (``Needs``), computed
    once at validation and shown by ``--dry-run``.

    Attributes:
        samples_per_prompt: ``rollout.samples_per_prompt`` or the estimator's default.
        needs_values: the advantage estimator needs a value model.
        needs_logits: the KL estimator needs full-vocabulary logits.
        greedy_baseline: the estimator needs the greedy responses' rewards.
        stateful: ``(kind, name, recipe path)`` of every selected component whose state is checkpointed.
        kl_active: a KL term is in play (the controller's declared ``Needs.active``: ``fixed`` with
            ``coef: 0`` has none); without one the RL stage runs no reference forward.
        precision: the top-level ``precision`` resolved on this host (``32`` or ``bf16-mixed``).
    """

    samples_per_prompt: int
    needs_values: bool
    needs_logits: bool
    greedy_baseline: bool
    stateful: tuple[tuple[str, str, str], ...]
    kl_active: bool = True
    precision: str = "32"


@dataclass
class Recipe:
    """A composed and validated recipe.

    Attributes:
        cfg: the fully resolved tree (written to ``config.yaml``; hashed for the stage cache).
        sections: ``{section: config dataclass}`` for every stage section and slot section.
        choices: ``{"kl.estimator": Choice, ...}`` every selected component.
        transforms: reward transforms in order; ``loggers``: logger choices.
        extra_losses: active extra losses (block present, ``coef`` != 0).
        ignored: keys ignored because they belong to a component that is not selected.
        registry: the registry the recipe was validated against.
        derived: settings derived from the components' declared needs.
    """

    cfg: DictConfig
    sections: dict[str, Any]
    choices: dict[str, Choice]
    transforms: list[Choice]
    loggers: list[Choice]
    extra_losses: list[Choice]
    ignored: list[str]
    registry: Registry
    derived: Derived

    @property
    def stages(self) -> list[str]:
        return list(self.cfg.stages)

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    def section(self, name: str) -> Any:
        return self.sections[name]

    def choice(self, key: str) -> Choice:
        return self.choices[key]

    def plain(self) -> dict[str, Any]:
        """The resolved tree as plain containers."""
        return OmegaConf.to_container(self.cfg, resolve=True)  # type: ignore[return-value]


def stage_sections(registry: Registry) -> dict[str, type]:
    """``{section: config dataclass}`` of every registered stage."""
    return {sec: cls for stage in registry.stages().values() for sec, cls in stage.sections.items()}


def validate_recipe(cfg: DictConfig, registry: Registry) -> Recipe:
    """Validate every key of a composed recipe; the first problem is a one-line ConfigError."""
    extra_names = registry.names("extra_loss")
    owned = stage_sections(registry)
    check_keys(cfg, field_names(RecipeSchema) + list(owned) + extra_names, "", "a recipe")
    stages = cfg.get("stages")
    if not isinstance(stages, (ListConfig, list)) or not stages:
        raise ConfigError(f"stages: list at least one stage (registered: {one_of(registry.names('stage'))})")
    for stage in stages:
        if stage not in registry.names("stage"):
            valid = registry.names("stage")
            raise ConfigError(
                f"stages: unknown stage '{stage}'{did_you_mean(str(stage), valid)} (valid: {one_of(valid)})"
            )
    if len(set(stages)) != len(stages):
        raise ConfigError(f"stages: a stage is listed twice ({', '.join(stages)})")
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed: must be an integer (got {seed!r})")
    check_seed(seed, "seed")
    _check_top_level(cfg)

    sections: dict[str, Any] = {}
    for name, cls in owned.items():
        block = cfg.get(name)
        if block is not None and not isinstance(block, (DictConfig, Mapping)):
            first = next(iter(field_names(cls)), "key")
            raise ConfigError(
                f"{name}: expected a mapping of the section's keys (e.g. {name}.{first}=...), got {block!r}"
            )
        sections[name] = validate(cls, block or {}, name)
    choices: dict[str, Choice] = {}
    ignored: list[str] = []
    for slot in SLOTS:
        block = cfg.get(slot.path)
        if not isinstance(block, (DictConfig, Mapping)):
            raise ConfigError(f"{slot.path}: expected a mapping with a 'name' key, got {block!r}")
        section, slot_choices, slot_ignored = _validate_slot(slot, block, slot.path, registry)
        sections[slot.path] = section
        choices.update(slot_choices)
        ignored += slot_ignored

    transforms = _validate_list(LIST_SLOTS[0], cfg.get("reward_transforms"), registry, ignored)
    loggers = _validate_list(LIST_SLOTS[1], cfg.get("loggers"), registry, ignored)

    extra_losses = []
    for name in extra_names:
        if name not in cfg:
            continue
        block = cfg.get(name)
        if not isinstance(block, (DictConfig, Mapping)):
            raise ConfigError(
                f"{name}: expected a mapping of the extra loss's keys (e.g. {name}.coef=1.0), got {block!r}"
            )
        spec = registry.get("extra_loss", name)
        check_keys(block, field_names(spec.config), name, f"extra_loss '{name}'")
        conf = validate(spec.config, block, name) if spec.config else None
        coef = dict(to_plain(conf)).get("coef", 1.0) if conf is not None else 1.0
        if float(coef) != 0.0:
            extra_losses.append(Choice("extra_loss", name, conf, name))

    _validate_trainer(cfg.get("trainer"))
    accelerator = (cfg.get("trainer") or {}).get("accelerator", "cpu")
    precision = resolve_precision(cfg.get("precision", "auto"), accelerator)
    derived = derive(sections, choices, transforms, extra_losses, registry, precision=precision)
    full = _fill_defaults(cfg, owned, sections, choices, transforms, loggers, registry)
    full.precision_resolved = precision  # recorded in RUN/config.yaml
    recipe = Recipe(full, sections, choices, transforms, loggers, extra_losses, ignored, registry, derived)
    _check_components(recipe)
    return recipe


def _check_top_level(cfg: DictConfig) -> None:
    """The core's own scalar keys, and the stage cache dir."""
    for key, nullable in (("description", True), ("extends", True), ("cache_dir", True)):
        value = cfg.get(key)
        if not isinstance(value, str) and not (nullable and value is None):
            raise ConfigError(f"{key}: expected a string{' or null' if nullable else ''}, got {value!r}")
    for key in ("smoke", "provenance"):
        value = cfg.get(key)
        if value is not None and not isinstance(value, (DictConfig, Mapping)):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    env = "INSTRUCTRL_CACHE_DIR"  # runner.CACHE_ENV (the runner imports this module)
    key, where = (
        ("cache_dir", cfg.get("cache_dir")) if cfg.get("cache_dir") else (f"${env}", os.environ.get(env))
    )
    if where and Path(where).expanduser().exists() and not Path(where).expanduser().is_dir():
        raise ConfigError(f"{key}: the stage cache must be a directory, and {where} is a file")


def planned_stages(recipe: Recipe) -> list[str]:
    """The stages a run of ``recipe`` executes or reads from the cache, upstream dependencies
    included and stages whose output the recipe supplies (``base.model``) left out."""
    from ..runner import stage_order  # the runner imports this module

    impls = recipe.registry.stages()
    return [s for s in stage_order(recipe) if impls[s].skip(recipe) is None]


def _check_components(recipe: Recipe) -> None:
    """Run the ``Needs.check(config, recipe, stages)`` every selected component declared.

    A config dataclass checks its own fields in ``__post_init__``; ``check`` is for what depends on
    the rest of the recipe (the stages that will run, the extra losses): e.g. the ``jsonl`` task
    names ``task.pretraining`` when ptx is on without it. It raises ``ValueError("field: ...")``;
    the block path is prefixed. Nothing is built.
    """
    selected = [*recipe.choices.values(), *recipe.transforms, *recipe.loggers, *recipe.extra_losses]
    checks = [(c, recipe.registry.needs(c.kind, c.name).check) for c in selected]
    checks = [(c, f) for c, f in checks if f is not None]
    if not checks:
        return
    stages = planned_stages(recipe)
    for choice, check in checks:
        try:
            check(choice.config, recipe, stages)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{choice.path}.{exc}") from None


def derive(
    sections: Mapping[str, Any],
    choices: Mapping[str, Choice],
    transforms: Sequence[Choice],
    extra_losses: Sequence[Choice],
    registry: Registry,
    *,
    precision: str = "32",
) -> Derived:
    """The settings that follow from the selected components' declared needs (and the resolved
    ``precision``)."""
    adv = choices["advantage"]
    needs = registry.needs("advantage", adv.name)
    rollout = sections.get("rollout")
    asked = rollout.samples_per_prompt if rollout is not None else None
    samples = asked or needs.default_samples_per_prompt
    if samples < needs.min_samples_per_prompt:
        raise ConfigError(
            f"rollout.samples_per_prompt: advantage '{adv.name}' compares samples of one prompt and needs >= "
            f"{needs.min_samples_per_prompt} (got {samples})"
        )
    selected = [*choices.values(), *transforms, *extra_losses]
    stateful = tuple((c.kind, c.name, c.path) for c in selected if registry.needs(c.kind, c.name).stateful)
    return Derived(
        samples_per_prompt=samples,
        needs_values=needs.values,
        needs_logits=registry.needs("kl_estimator", choices["kl.estimator"].name).logits,
        greedy_baseline=needs.greedy_baseline,
        stateful=stateful,
        kl_active=kl_active(choices["kl.controller"], registry),
        precision=precision,
    )


def kl_active(controller: Choice, registry: Registry) -> bool:
    """Whether the KL controller can ever apply a penalty: its declared ``Needs.active`` on its
    config, read without building it (no declaration: always)."""
    active = registry.needs(controller.kind, controller.name).active
    return active is None or bool(active(controller.config))


def _fill_defaults(
    cfg: DictConfig,
    owned: Mapping[str, type],
    sections: dict[str, Any],
    choices: dict[str, Choice],
    transforms: list[Choice],
    loggers: list[Choice],
    registry: Registry,
) -> DictConfig:
    """The resolved tree with every default written out (what ``config.yaml`` records and the stage
    cache hashes): sections, the selected components' own keys, list items, extra-loss blocks."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    for name in owned:
        data[name] = to_plain(sections[name])
    for slot in SLOTS:
        block = dict(to_plain(sections[slot.path]))
        for key in slot.selectors:
            label = slot.path if key == "name" else f"{slot.path}.{key}"
            conf = choices[label].config
            if conf is not None:
                block.update(to_plain(conf))
        data[slot.path] = block
    for slot, items in zip(LIST_SLOTS, (transforms, loggers)):
        data[slot.path] = [
            {"name": c.name, **(to_plain(c.config) if c.config is not None else {})} for c in items
        ]
    for name in registry.names("extra_loss"):
        if name in data:
            spec = registry.get("extra_loss", name)
            if spec.config is not None:
                data[name] = to_plain(validate(spec.config, data[name], name))
    return OmegaConf.create(data)


def _validate_slot(
    slot: Slot, block: Mapping[str, Any], path: str, registry: Registry
) -> tuple[Any, dict[str, Choice], list[str]]:
    section_keys = field_names(slot.section)
    section_data = {k: v for k, v in block.items() if k in section_keys}
    section = validate(slot.section, section_data, path)
    own_fields: list[str] = []
    sibling_fields: set[str] = set()
    specs = {}
    for key, kind in slot.selectors.items():
        spec = registry.get(kind, getattr(section, key), f"{path}.{key}")
        specs[key] = spec
        own_fields += field_names(spec.config)
        sibling_fields |= {f for n in registry.names(kind) for f in field_names(registry.get(kind, n).config)}
    what = " / ".join(f"{s.kind} '{s.name}'" for s in specs.values())
    ignored = check_keys(block, section_keys + own_fields, path, what, ignorable=sibling_fields)
    choices = {}
    for key, spec in specs.items():
        mine = {k: v for k, v in block.items() if k in field_names(spec.config)}
        conf = validate(spec.config, mine, path) if spec.config else None
        label = path if key == "name" else f"{path}.{key}"
        choices[label] = Choice(spec.kind, spec.name, conf, path)
    return section, choices, [f"{path}.{k}" for k in ignored]


def _validate_list(slot: Slot, items: Any, registry: Registry, ignored: list[str]) -> list[Choice]:
    if items is None:
        return []
    if not isinstance(items, (ListConfig, list)):
        raise ConfigError(
            f"{slot.path}: expected a list of blocks with a 'name' key (e.g. [{{name: ...}}]), got {items!r}"
        )
    out = []
    for i, item in enumerate(items):
        path = f"{slot.path}[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, (DictConfig, Mapping)) or "name" not in item:
            raise ConfigError(f"{path}: expected a block with a 'name' key, got {item!r}")
        _, choices, ign = _validate_slot(slot, item, path, registry)
        ignored += ign
        out.append(next(iter(choices.values())))
    return out


def _fits(value: Any, hint: Any) -> bool:
    """Whether a recipe value (numbers, strings, lists, mappings) can be an argument typed ``hint``;
    types a recipe cannot write (classes such as ``Strategy``) match nothing."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (list, Sequence, Iterable):
        return isinstance(value, (ListConfig, list)) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, (DictConfig, Mapping)) and all(_fits(v, args[1]) for v in value.values())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool, type(None)):
        return isinstance(value, hint)
    return False


def _validate_trainer(trainer: Mapping[str, Any]) -> None:
    from lightning.pytorch import Trainer

    if not isinstance(trainer, (DictConfig, Mapping)):
        raise ConfigError(
            f"trainer: expected a mapping of lightning.Trainer arguments (e.g. trainer.devices=1), got {trainer!r}"
        )

    valid = [p for p in inspect.signature(Trainer.__init__).parameters if p != "self"]
    for key in trainer:
        if key in STAGE_OWNED_TRAINER_KEYS:
            raise ConfigError(f"trainer.{key}: not settable here ({STAGE_OWNED_TRAINER_KEYS[key]})")
    allowed = [k for k in valid if k not in STAGE_OWNED_TRAINER_KEYS]
    check_keys(trainer, allowed, "trainer", "lightning.Trainer")
    hints = typing.get_type_hints(Trainer.__init__)
    for key, value in trainer.items():
        if key in hints and not _fits(value, hints[key]):
            raise ConfigError(
                f"trainer.{key}: expected {type_name(hints[key]) or 'another type'} (lightning.Trainer), got {value!r}"
            )
    devices = trainer.get("devices", 1)
    if isinstance(devices, int) and devices < 1 and devices != -1:
        raise ConfigError(f"trainer.devices: must be >= 1 or -1 (got {devices})")
    if isinstance(devices, str) and not re.fullmatch(r"auto|-1|\d+|\d+(\s*,\s*\d+)*\s*,?", devices.strip()):
        raise ConfigError(
            f"trainer.devices: expected a count, -1, 'auto' or device ids like '0,1' (got {devices!r})"
        )
    if isinstance(devices, (ListConfig, list)) and (not devices or any(d < 0 for d in devices)):
        raise ConfigError(
            f"trainer.devices: a list of device ids must be non-empty and >= 0 (got {list(devices)})"
        )


def load_recipe(
    recipe: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    *,
    smoke: bool = False,
    registry: Registry | None = None,
) -> Recipe:
    """Compose and validate a recipe (the launcher's first step)."""
    from ..registry import get_registry

    cfg = compose(recipe, overrides, smoke=smoke)
    return validate_recipe(cfg, registry or get_registry())
