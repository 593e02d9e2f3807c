"""Recipes: the schema, loading (``extends``, the smoke overlay, ``key=value`` overrides,
interpolation) and validation of every block before anything is built.

A recipe is an OmegaConf YAML file. Its keys are the fields of :class:`RecipeSchema`, plus one
top-level block per active extra loss (``ptx:``). Component blocks (``task``, ``policy``, ``value``,
``reward``, ``advantage``, ``objective``, ``kl``, ``reward_transforms``, ``loggers``) select a
registered component by name and carry that component's own keys; they are validated against the
component's config dataclass.

Stage inputs that another stage produces are written ``@<stage>`` (``policy.model: "@sft"``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .fields import check_keys, field_names, param, to_plain, validate
from .errors import ConfigError, did_you_mean, one_of
from .registry import Registry

STAGE_NAMES = ("pretrain", "sft", "rm", "rl", "eval")
SMOKE_OVERLAY = "_smoke"

# ============================================================================================
# Schema: stage sections
# ============================================================================================


@dataclass
class BaseSection:
    """``base``: the base language model (stands in for GPT-3)."""

    model: str | None = param(None, "An existing HF causal-LM dir; when set the pretrain stage is skipped.")
    arch: Literal["llama", "gpt2"] = param(
        "llama", "Architecture of the tiny base model built from a config."
    )
    hidden_size: int = param(128, "Width of the tiny base model.")
    layers: int = param(4, "Transformer blocks.")
    heads: int = param(4, "Attention heads (must divide hidden_size).")
    intermediate_size: int | None = param(
        None, "MLP width; null means 4 × hidden_size (gpt2) or 8/3 × (llama)."
    )
    max_positions: int = param(256, "Longest sequence the model accepts.")
    tokenizer: Literal["char", "bpe"] = param(
        "char", "Tokenizer trained on the task's text: one token per character, or byte-level BPE."
    )
    vocab_size: int = param(512, "BPE vocabulary size (tokenizer=bpe only).")
    trust_remote_code: bool = param(False, "Allow model code from the model dir (only for models you trust).")

    def __post_init__(self) -> None:
        for name in ("hidden_size", "layers", "heads", "max_positions", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.hidden_size % self.heads:
            raise ValueError(
                f"heads must divide hidden_size (got heads={self.heads}, hidden_size={self.hidden_size})"
            )


@dataclass
class PretrainSection:
    """``pretrain``: the tiny base LM trained on the task's pretraining corpus."""

    seed: int = param(0, "Seed of the pretrain stage.")
    steps: int = param(3000, "Optimiser steps.")
    batch_size: int = param(32, "Sequences per step (per process).")
    seq_len: int = param(128, "Tokens per training sequence (texts are packed).")
    lr: float = param(2e-3, "Peak learning rate (AdamW), cosine decay after warmup.")
    warmup_steps: int = param(100, "Linear warmup steps.")
    weight_decay: float = param(0.1, "AdamW weight decay.")

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size", "seq_len", "lr")


@dataclass
class SFTSection:
    """``sft``: supervised fine-tuning on the labeler demonstrations."""

    seed: int = param(0, "Seed of the SFT stage.")
    model: str = param("@pretrain", "Model to fine-tune: '@pretrain' or an HF causal-LM dir.")
    epochs: int = param(16, "Epochs over the demonstrations (paper: 16).")
    batch_size: int = param(32, "Demonstrations per step (per process).")
    lr: float = param(1e-3, "Peak learning rate (AdamW).")
    schedule: Literal["cosine", "constant"] = param(
        "cosine", "Learning-rate schedule after warmup (paper: cosine)."
    )
    warmup_ratio: float = param(0.05, "Fraction of steps spent in linear warmup.")
    weight_decay: float = param(0.0, "AdamW weight decay.")
    dropout: float = param(0.0, "Residual/attention dropout during SFT (paper: 0.2 at 175B scale).")
    response_only: bool = param(True, "Loss on response tokens only (prompt tokens masked).")
    val_fraction: float = param(0.05, "Fraction of demonstrations held out for the validation loss.")

    def __post_init__(self) -> None:
        _positive(self, "epochs", "batch_size", "lr")
        _unit(self, "warmup_ratio", "dropout", "val_fraction")


@dataclass
class RMSection:
    """``rm``: the reward model trained on K-way rankings of SFT samples."""

    seed: int = param(0, "Seed of the RM stage (sampling for rankings and training).")
    model: str = param("@sft", "Initialisation: '@sft' or an HF causal-LM dir; a scalar head is added.")
    epochs: int = param(1, "Epochs over the rankings (paper: 1; more overfits).")
    batch_size: int = param(16, "Prompts per step; all C(K,2) pairs of a prompt are one batch element.")
    lr: float = param(3e-4, "Peak learning rate (AdamW), cosine decay.")
    warmup_ratio: float = param(0.05, "Fraction of steps spent in linear warmup.")
    weight_decay: float = param(0.0, "AdamW weight decay.")
    sample_temperature: float = param(1.0, "Temperature of the SFT samples the labeler ranks.")
    max_new_tokens: int = param(32, "Token budget of the SFT samples the labeler ranks.")

    def __post_init__(self) -> None:
        _positive(self, "epochs", "batch_size", "lr", "sample_temperature", "max_new_tokens")
        _unit(self, "warmup_ratio")


@dataclass
class RolloutSection:
    """``rollout``: how responses are sampled in RL."""

    prompts_per_iteration: int = param(64, "Prompts sampled per PPO iteration (per process).")
    samples_per_prompt: int | None = param(
        None, "Responses per prompt; null = the advantage estimator's default (gae 1, group estimators 4)."
    )
    temperature: float = param(1.0, "Sampling temperature; logprobs are computed at the same temperature.")
    max_new_tokens: int = param(32, "Response token budget; a response without EOS is truncated.")

    def __post_init__(self) -> None:
        _positive(self, "prompts_per_iteration", "temperature", "max_new_tokens")
        if self.samples_per_prompt is not None and self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1 or null (got {self.samples_per_prompt})")


@dataclass
class RLSection:
    """``rl``: the optimisation loop of the RL stage."""

    iterations: int = param(150, "PPO iterations (rollout → optimise).")
    epochs: int = param(4, "Optimisation epochs over each iteration's rollouts (lm-human-preferences: 4).")
    minibatches: int = param(4, "Minibatches per epoch; each is one optimiser step.")
    micro_batch_size: int | None = param(
        None,
        "Split each minibatch into micro-batches of this many sequences (gradient accumulation); null = no split.",
    )
    lr: float = param(1e-4, "Policy learning rate (AdamW, constant after warmup).")
    warmup_iterations: int = param(0, "Linear learning-rate warmup, in iterations.")
    weight_decay: float = param(0.0, "AdamW weight decay (policy and value).")
    grad_clip: float | None = param(
        1.0, "Max gradient norm (policy and value separately); null = no clipping."
    )
    entropy_coef: float = param(0.0, "Entropy bonus coefficient (subtracted from the policy loss).")
    checkpoint_every: int = param(25, "Save a checkpoint every N iterations (and at the end).")
    check_ratio: bool = param(
        True, "Assert ratio == 1 and approx-KL == 0 on the first minibatch of every iteration."
    )

    def __post_init__(self) -> None:
        _positive(self, "iterations", "epochs", "minibatches", "lr", "checkpoint_every")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or null (got {self.micro_batch_size})")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or null (got {self.grad_clip})")
        if self.entropy_coef < 0:
            raise ValueError(f"entropy_coef must be >= 0 (got {self.entropy_coef})")


@dataclass
class EvalSection:
    """``eval``: held-out evaluation at the end of RL and every ``every`` iterations."""

    n_prompts: int = param(500, "Held-out prompts in the final evaluation.")
    every: int = param(25, "Evaluate every N RL iterations (0 = only at the end).")
    n_prompts_during: int = param(128, "Held-out prompts in the periodic evaluation.")
    temperature: float = param(1.0, "Sampling temperature of the T=1 comparison.")
    greedy: bool = param(True, "Also compare greedy responses.")
    max_new_tokens: int | None = param(None, "Response budget; null = rollout.max_new_tokens.")
    batch_size: int = param(64, "Prompts per generation batch.")
    n_samples: int = param(24, "Rows in the samples table (samples/eval.jsonl and the report).")
    pretrain_docs: int = param(
        256, "Held-out pretraining documents for the LM-loss (alignment tax) measurement."
    )

    def __post_init__(self) -> None:
        _positive(self, "n_prompts", "n_prompts_during", "temperature", "batch_size", "pretrain_docs")
        if self.every < 0:
            raise ValueError(f"every must be >= 0 (got {self.every})")


# ============================================================================================
# Schema: component slots
# ============================================================================================


@dataclass
class TaskSection:
    name: str = param("world", "The Task: 'world' (simulated labelers) or 'jsonl' (your files).")


@dataclass
class PolicySection:
    name: str = param("hf", "The Policy implementation.")


@dataclass
class ValueSection:
    name: str = param("hf", "The value model implementation (built only for estimators that need values).")
    lr: float = param(1e-4, "Value-model learning rate.")
    coef: float = param(0.1, "Value-loss coefficient (lm-human-preferences vf_coef: 0.1).")
    clip: float | None = param(0.2, "Value clipping range around the rollout values; null = no clipping.")

    def __post_init__(self) -> None:
        _positive(self, "lr")
        if self.coef < 0:
            raise ValueError(f"coef must be >= 0 (got {self.coef})")
        if self.clip is not None and self.clip <= 0:
            raise ValueError(f"clip must be > 0 or null (got {self.clip})")


@dataclass
class RewardSection:
    name: str = param("learned", "The reward model: learned, gold, callable or ensemble.")


@dataclass
class AdvantageSection:
    name: str = param("gae", "The advantage estimator.")


@dataclass
class ObjectiveSection:
    name: str = param("ppo_clip", "The policy objective.")


@dataclass
class KLSection:
    estimator: str = param("k1", "Per-token KL estimator (k1, k2, k3, abs, full).")
    controller: str = param("fixed", "KL coefficient controller (fixed, adaptive).")
    placement: Literal["reward", "loss"] = param(
        "reward",
        "Where the KL penalty applies: in the per-token reward (InstructGPT) or as a loss term (GRPO-style).",
    )


@dataclass
class ListItemSection:
    name: str = param(dataclasses.MISSING, "The component's registered name.")


@dataclass(frozen=True)
class Slot:
    """A recipe block that selects components: its path, the selector keys (→ kind) and the
    dataclass of the block's own keys (selectors included)."""

    path: str
    selectors: Mapping[str, str]
    section: type


SLOTS: tuple[Slot, ...] = (
    Slot("task", {"name": "task"}, TaskSection),
    Slot("policy", {"name": "policy"}, PolicySection),
    Slot("value", {"name": "value_model"}, ValueSection),
    Slot("reward", {"name": "reward_model"}, RewardSection),
    Slot("advantage", {"name": "advantage"}, AdvantageSection),
    Slot("objective", {"name": "objective"}, ObjectiveSection),
    Slot("kl", {"estimator": "kl_estimator", "controller": "kl_controller"}, KLSection),
)
LIST_SLOTS: tuple[Slot, ...] = (
    Slot("reward_transforms", {"name": "reward_transform"}, ListItemSection),
    Slot("loggers", {"name": "logger"}, ListItemSection),
)


@dataclass
class RecipeSchema:
    """Every top-level recipe key and its default (component defaults are the paper's values)."""

    description: str = param("", "One line shown by `instructrl recipes`.")
    extends: str | None = param(None, "A bundled recipe name or a path this recipe builds on.")
    stages: list[str] = param(
        factory=lambda: ["rl", "eval"],
        help="Stages this run executes, in order; their upstream stages come from the stage cache.",
    )
    seed: int = param(0, "Seed of the RL stage and evaluation (upstream stages have their own).")
    cache_dir: str | None = param(
        None, "Stage cache dir; null = $INSTRUCTRL_CACHE_DIR or ~/.cache/instructrl."
    )
    base: dict[str, Any] = param(factory=dict, help="See BaseSection.")
    pretrain: dict[str, Any] = param(factory=dict, help="See PretrainSection.")
    sft: dict[str, Any] = param(factory=dict, help="See SFTSection.")
    rm: dict[str, Any] = param(factory=dict, help="See RMSection.")
    rollout: dict[str, Any] = param(factory=dict, help="See RolloutSection.")
    rl: dict[str, Any] = param(factory=dict, help="See RLSection.")
    eval: dict[str, Any] = param(factory=dict, help="See EvalSection.")
    task: dict[str, Any] = param(factory=lambda: {"name": "world"}, help="The Task block.")
    policy: dict[str, Any] = param(factory=lambda: {"name": "hf", "model": "@sft"}, help="The Policy block.")
    value: dict[str, Any] = param(
        factory=lambda: {"name": "hf", "model": "@rm"}, help="The value-model block."
    )
    reward: dict[str, Any] = param(
        factory=lambda: {"name": "learned", "model": "@rm"}, help="The reward-model block."
    )
    reward_transforms: list[Any] = param(
        factory=lambda: [{"name": "demo_bias"}, {"name": "missing_eos_penalty"}],
        help="Reward transforms applied in order to the sequence scores.",
    )
    advantage: dict[str, Any] = param(factory=lambda: {"name": "gae"}, help="The advantage-estimator block.")
    objective: dict[str, Any] = param(factory=lambda: {"name": "ppo_clip"}, help="The objective block.")
    kl: dict[str, Any] = param(
        factory=lambda: {"estimator": "k1", "controller": "fixed", "placement": "reward"},
        help="The KL block.",
    )
    trainer: dict[str, Any] = param(
        factory=lambda: {"accelerator": "cpu", "devices": 1},
        help="Lightning Trainer arguments for every stage.",
    )
    loggers: list[Any] = param(factory=lambda: [{"name": "csv"}], help="Lightning loggers of every stage.")
    smoke: dict[str, Any] = param(factory=dict, help="Extra overrides this recipe applies under --smoke.")
    provenance: dict[str, Any] = param(
        factory=dict,
        help="Written by the launcher into RUN/config.yaml (versions, commit, seed); ignored on input.",
    )


SECTIONS: dict[str, type] = {
    "base": BaseSection,
    "pretrain": PretrainSection,
    "sft": SFTSection,
    "rm": RMSection,
    "rollout": RolloutSection,
    "rl": RLSection,
    "eval": EvalSection,
}

# Trainer arguments that the stages own; setting them in `trainer` is an error.
STAGE_OWNED_TRAINER_KEYS = {
    "max_epochs": "set by the stage from its own keys (e.g. sft.epochs, rl.iterations)",
    "max_steps": "set by the stage from its own keys (e.g. pretrain.steps)",
    "logger": "use the `loggers` list",
    "callbacks": "callbacks are set by the stage",
    "default_root_dir": "each stage writes into RUN/<stage>/",
    "enable_checkpointing": "checkpointing is managed by the stage",
    "use_distributed_sampler": "the stage shards data itself where needed",
}


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None or value <= 0:
            raise ValueError(f"{name} must be > 0 (got {value})")


def _unit(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1) (got {value})")


# ============================================================================================
# Loading
# ============================================================================================


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
    """Defaults ← recipe (with its ``extends`` chain) ← smoke overlay ← overrides, interpolated."""
    defaults = OmegaConf.create(dataclasses.asdict(RecipeSchema()))
    path = recipe_path(recipe)
    cfg = OmegaConf.merge(defaults, _load_chain(path))
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


# ============================================================================================
# Validation
# ============================================================================================


@dataclass(frozen=True)
class Choice:
    """A selected component: kind, name, validated config, and the recipe path of its block."""

    kind: str
    name: str
    config: Any
    path: str


@dataclass
class Recipe:
    """A composed and validated recipe.

    Attributes:
        cfg: the fully resolved tree (written to ``config.yaml``; hashed for the stage cache).
        sections: ``{section: config dataclass}`` for base/pretrain/sft/rm/rollout/rl/eval and the
            slot sections (``kl``, ``value`` …).
        choices: ``{"kl.estimator": Choice, ...}`` every selected component.
        transforms: reward transforms in order; ``loggers``: logger choices.
        extra_losses: active extra losses (block present, ``coef`` != 0).
        ignored: keys ignored because they belong to a component that is not selected.
        registry: the registry the recipe was validated against.
    """

    cfg: DictConfig
    sections: dict[str, Any]
    choices: dict[str, Choice]
    transforms: list[Choice]
    loggers: list[Choice]
    extra_losses: list[Choice]
    ignored: list[str]
    registry: Registry

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


def validate_recipe(cfg: DictConfig, registry: Registry) -> Recipe:
    """Validate every key of a composed recipe; the first problem is a one-line ConfigError."""
    extra_names = registry.names("extra_loss")
    top_fields = field_names(RecipeSchema)
    check_keys(cfg, top_fields + extra_names, "", "a recipe")

    stages = list(cfg.stages)
    for stage in stages:
        if stage not in STAGE_NAMES:
            raise ConfigError(
                f"stages: unknown stage '{stage}'{did_you_mean(str(stage), STAGE_NAMES)} (valid: {one_of(STAGE_NAMES)})"
            )
    if len(set(stages)) != len(stages):
        raise ConfigError(f"stages: a stage is listed twice ({', '.join(stages)})")
    order = [s for s in STAGE_NAMES if s in stages]
    if stages != order:
        raise ConfigError(
            f"stages: must follow pipeline order {' → '.join(STAGE_NAMES)} (got {', '.join(stages)})"
        )
    if "eval" in stages and "rl" not in stages:
        raise ConfigError(
            "stages: 'eval' evaluates the RL policy and needs 'rl' (use `instructrl eval MODEL_DIR` for a standalone evaluation)"
        )

    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        sections[name] = validate(cls, cfg.get(name) or {}, name)

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
        if float(getattr(conf, "coef", 1.0)) != 0.0:
            extra_losses.append(Choice("extra_loss", name, conf, name))

    _validate_trainer(cfg.get("trainer") or {})
    full = _fill_defaults(cfg, sections, choices, transforms, loggers, extra_losses, registry)
    recipe = Recipe(full, sections, choices, transforms, loggers, extra_losses, ignored, registry)
    _cross_checks(recipe)
    return recipe


def _fill_defaults(
    cfg: DictConfig,
    sections: dict[str, Any],
    choices: dict[str, Choice],
    transforms: list[Choice],
    loggers: list[Choice],
    extra_losses: list[Choice],
    registry: Registry,
) -> DictConfig:
    """The resolved tree with every default written out (what ``config.yaml`` records and the stage
    cache hashes): sections, the selected components' own keys, list items, extra-loss blocks."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    for name in SECTIONS:
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
    import inspect

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


def _cross_checks(recipe: Recipe) -> None:
    """Settings that cannot go together, checked before anything is built."""
    reg = recipe.registry
    adv = recipe.choice("advantage")
    spec = reg.get("advantage", adv.name)
    # Ask the estimator class for its requirements without building it (attributes on the factory
    # or its return annotation are not reliable); build it with a bare context instead — estimator
    # factories must be cheap and side-effect free.
    from .registry import BuildContext

    est = spec.factory(adv.config, BuildContext(registry=reg, seed=recipe.seed))
    rollout = recipe.section("rollout")
    samples = rollout.samples_per_prompt or est.default_samples_per_prompt
    if samples < est.min_samples_per_prompt:
        raise ConfigError(
            f"rollout.samples_per_prompt: advantage '{adv.name}' compares samples of one prompt and needs >= "
            f"{est.min_samples_per_prompt} (got {samples})"
        )
    if "rl" in recipe.stages or "eval" in recipe.stages:
        rl = recipe.section("rl")
        per_iter = rollout.prompts_per_iteration * samples
        if per_iter % rl.minibatches:
            raise ConfigError(
                f"rl.minibatches: must divide the episodes per iteration (prompts_per_iteration × samples_per_prompt = "
                f"{per_iter}; got minibatches={rl.minibatches})"
            )
        mb = per_iter // rl.minibatches
        if rl.micro_batch_size is not None and mb % rl.micro_batch_size:
            raise ConfigError(
                f"rl.micro_batch_size: must divide the minibatch size {mb} (got {rl.micro_batch_size})"
            )


def samples_per_prompt(recipe: Recipe) -> int:
    """``rollout.samples_per_prompt`` or the advantage estimator's default."""
    from .registry import BuildContext

    adv = recipe.choice("advantage")
    est = recipe.registry.build("advantage", adv.name, adv.config, BuildContext(registry=recipe.registry))
    return recipe.section("rollout").samples_per_prompt or est.default_samples_per_prompt


def load_recipe(
    recipe: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    *,
    smoke: bool = False,
    registry: Registry | None = None,
) -> Recipe:
    """Compose and validate a recipe (the launcher's first step)."""
    from .registry import get_registry

    cfg = compose(recipe, overrides, smoke=smoke)
    return validate_recipe(cfg, registry or get_registry())


# ============================================================================================
# Hashing (stage cache keys)
# ============================================================================================


def stable_hash(obj: Any) -> str:
    """A short sha256 of a JSON-serialisable object (keys sorted)."""
    text = json.dumps(to_plain(obj), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


__all__ = [
    "SECTIONS",
    "SLOTS",
    "STAGE_NAMES",
    "BaseSection",
    "Choice",
    "EvalSection",
    "PretrainSection",
    "RLSection",
    "RMSection",
    "Recipe",
    "RecipeSchema",
    "RolloutSection",
    "SFTSection",
    "bundled_recipes",
    "compose",
    "load_recipe",
    "stable_hash",
    "validate_recipe",
]
