"""The recipe schema owned by the core: the top-level keys and the component slots.

Stage sections (``sft``, ``rl`` …) belong to the stages that register them; extra-loss blocks
(``ptx``) to their extra losses. The component choices every recipe starts from are in the bundled
``recipes/_defaults.yaml``, not here: the core names no component.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from ..fields import param

RecipeValue = object
"""A recipe block's plain value (OmegaConf-resolved containers, numbers, strings)."""


@dataclass
class TaskSection:
    name: str = param(dataclasses.MISSING, "The Task (`instructrl plugins` lists them).")


@dataclass
class PolicySection:
    name: str = param(dataclasses.MISSING, "The Policy implementation.")


@dataclass
class ValueSection:
    name: str = param(dataclasses.MISSING, "The value model (built only for estimators that need values).")
    lr: float = param(1e-4, "Value-model learning rate.")
    coef: float = param(0.1, "Value-loss coefficient (lm-human-preferences vf_coef: 0.1).")
    clip: float | None = param(0.2, "Value clipping range around the rollout values; null = no clipping.")

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0 (got {self.lr})")
        if self.coef < 0:
            raise ValueError(f"coef must be >= 0 (got {self.coef})")
        if self.clip is not None and self.clip <= 0:
            raise ValueError(f"clip must be > 0 or null (got {self.clip})")


@dataclass
class RewardSection:
    name: str = param(dataclasses.MISSING, "The reward model.")


@dataclass
class AdvantageSection:
    name: str = param(dataclasses.MISSING, "The advantage estimator.")


@dataclass
class ObjectiveSection:
    name: str = param(dataclasses.MISSING, "The policy objective.")


@dataclass
class KLSection:
    estimator: str = param(dataclasses.MISSING, "Per-token KL estimator.")
    controller: str = param(dataclasses.MISSING, "KL coefficient controller.")
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
    """Every top-level key the core owns (stages add their sections, extra losses their blocks)."""

    description: str = param("", "One line shown by `instructrl recipes`.")
    extends: str | None = param(None, "A bundled recipe name or a path this recipe builds on.")
    stages: list[str] = param(
        factory=list,
        help="Stages this run executes, in order; their upstream stages come from the stage cache.",
    )
    seed: int = param(0, "Seed of the RL stage and evaluation (upstream stages have their own).")
    precision: str = param(
        "auto",
        "Numeric precision of every stage: auto (bf16-mixed where bf16 is native: a bf16 CUDA device, or a "
        "CPU with avx512_bf16/amx_bf16; else 32), 32 or bf16-mixed. Logprobs, KL and losses stay fp32.",
    )
    precision_resolved: str | None = param(
        None,
        "Written at validation (RUN/config.yaml): what `precision` resolved to on this host; ignored on input.",
    )
    cache_dir: str | None = param(
        None, "Stage cache dir; null = $INSTRUCTRL_CACHE_DIR or ~/.cache/instructrl."
    )
    task: dict[str, RecipeValue] = param(factory=dict, help="The Task block.")
    policy: dict[str, RecipeValue] = param(factory=dict, help="The Policy block.")
    value: dict[str, RecipeValue] = param(factory=dict, help="The value-model block.")
    reward: dict[str, RecipeValue] = param(factory=dict, help="The reward-model block.")
    reward_transforms: list[RecipeValue] = param(
        factory=list, help="Reward transforms applied in order to the sequence scores."
    )
    advantage: dict[str, RecipeValue] = param(factory=dict, help="The advantage-estimator block.")
    objective: dict[str, RecipeValue] = param(factory=dict, help="The objective block.")
    kl: dict[str, RecipeValue] = param(factory=dict, help="The KL block.")
    trainer: dict[str, RecipeValue] = param(
        factory=lambda: {"accelerator": "cpu", "devices": 1},
        help="Lightning Trainer arguments for every stage.",
    )
    loggers: list[RecipeValue] = param(factory=list, help="Lightning loggers of every stage.")
    smoke: dict[str, RecipeValue] = param(
        factory=dict, help="Extra overrides this recipe applies under --smoke."
    )
    provenance: dict[str, RecipeValue] = param(
        factory=dict,
        help="Written by the launcher into RUN/config.yaml (versions, commit, seed); ignored on input.",
    )


# Trainer arguments that the stages own; setting them in `trainer` is an error.
STAGE_OWNED_TRAINER_KEYS = {
    "max_epochs": "set by the stage from its own keys (e.g. sft.epochs, rl.iterations)",
    "max_steps": "set by the stage from its own keys (e.g. pretrain.steps)",
    "logger": "use the `loggers` list",
    "callbacks": "callbacks are set by the stage",
    "default_root_dir": "each stage writes into RUN/<stage>/",
    "enable_checkpointing": "checkpointing is managed by the stage",
    "use_distributed_sampler": "the stage shards data itself where needed",
    "precision": "use the top-level precision key: auto, 32 or bf16-mixed",
}
