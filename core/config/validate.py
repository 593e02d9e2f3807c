"""Validation of a composed recipe before anything is built: every key against the schema, each
stage's sections and each selected component's config dataclass; the derived settings (samples per
prompt, whether a value model or logits are needed) computed once from what components declared.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..errors import ConfigError, did_you_mean, one_of
from ..fields import check_keys, field_names, to_plain, validate
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
    """

    samples_per_prompt: int
    needs_values: bool
    needs_logits: bool
    greedy_baseline: bool
    stateful: tuple[tuple[str, str, str], ...]


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

    sections: dict[str, Any] = {name: validate(cls, cfg.get(name) or {}, name) for name, cls in owned.items()}
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

    _validate_trainer(cfg.get("trainer") or {})
    derived = derive(sections, choices, transforms, extra_losses, registry)
    full = _fill_defaults(cfg, owned, sections, choices, transforms, loggers, registry)
    return Recipe(full, sections, choices, transforms, loggers, extra_losses, ignored, registry, derived)


def derive(
    sections: Mapping[str, Any],
    choices: Mapping[str, Choice],
    transforms: Sequence[Choice],
    extra_losses: Sequence[Choice],
    registry: Registry,
) -> Derived:
    """The settings that follow from the selected components' declared needs."""
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
    )


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


def _validate_trainer(trainer: Mapping[str, Any]) -> None:
    from lightning.pytorch import Trainer

    valid = [p for p in inspect.signature(Trainer.__init__).parameters if p != "self"]
    for key in trainer:
        if key in STAGE_OWNED_TRAINER_KEYS:
            raise ConfigError(f"trainer.{key}: not settable here ({STAGE_OWNED_TRAINER_KEYS[key]})")
    allowed = [k for k in valid if k not in STAGE_OWNED_TRAINER_KEYS]
    check_keys(trainer, allowed, "trainer", "lightning.Trainer")
    devices = trainer.get("devices", 1)
    if isinstance(devices, int) and devices < 1 and devices != -1:
        raise ConfigError(f"trainer.devices: must be >= 1 or -1 (got {devices})")


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
