"""Reward models beyond the learned one: ``gold`` (the task's judge), ``callable`` (your Python
function) and ``ensemble`` (mean of several). ``learned`` lives with the HF models (plugins/hf.py).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from instructrl.core.errors import ConfigError, RunFailure
from instructrl.core.fields import check_keys, field_names, param, validate
from instructrl.core.hookspecs import Register, hookimpl
from instructrl.core.protocols import GoldJudge, RewardModel
from instructrl.core.registry import BuildContext
from instructrl.core.types import RewardInput
from torch import Tensor

# --------------------------------------------------------------------------------------------
# gold
# --------------------------------------------------------------------------------------------


class GoldReward:
    """The task's gold judge as the reward (an upper bound; over-optimisation studies)."""

    def __init__(self, judge: GoldJudge) -> None:
        self.judge = judge

    def score(self, inp: RewardInput) -> Tensor:
        return torch.tensor(self.judge.score(inp.prompts, inp.completions), dtype=torch.float)

    def demo_mean(self) -> float | None:
        """Unknown: ``demo_bias`` scores the demonstrations itself."""
        return None


def make_gold(config: None, ctx: BuildContext) -> GoldReward:
    """The task's gold judge as the reward model (upper bound for over-optimisation studies)."""
    judge = ctx.task.gold if ctx.task is not None else None
    if judge is None:
        raise ConfigError("reward.name: 'gold' needs a task with a gold judge (task.name=world)")
    return GoldReward(judge)


# --------------------------------------------------------------------------------------------
# callable
# --------------------------------------------------------------------------------------------


@dataclass
class CallableConfig:
    fn: str = param(help="The function, as 'package.module:function'.")

    def __post_init__(self) -> None:
        if (
            not isinstance(self.fn, str)
            or ":" not in self.fn
            or self.fn.startswith(":")
            or self.fn.endswith(":")
        ):
            raise ValueError(f"fn must look like 'package.module:function' (got {self.fn!r})")
        import_function(self.fn, "fn")  # fail at validation (and in --dry-run), not mid-run


def import_function(spec: str, key: str) -> Callable[..., object]:
    """Import ``package.module:function``; a ValueError naming ``key`` when it cannot (the config
    validation turns it into a one-line ConfigError with the recipe path)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ValueError(
            f"{key}: cannot import module '{module_name}': {type(exc).__name__}: {exc}"
        ) from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"{key}: module '{module_name}' has no attribute '{attr}'")
    if not callable(fn):
        raise ValueError(f"{key}: '{spec}' is not callable")
    return fn


class CallableReward:
    """Calls ``fn(prompts=[...], completions=[...], completion_ended=[...], **fields)``.

    Like TRL's reward functions, the dataset row's other fields arrive as keyword arguments, one
    list per field (e.g. ``answer=[...]``, ``kind=[...]``); declare ``**kwargs`` to ignore them.
    It must return one float per completion.
    """

    def __init__(self, fn: Callable[..., object], name: str) -> None:
        self.fn = fn
        self.name = name

    def demo_mean(self) -> float | None:
        """Unknown: ``demo_bias`` scores the demonstrations itself."""
        return None

    def score(self, inp: RewardInput) -> Tensor:
        n = len(inp.completions)
        fields: dict[str, list[object]] = {}
        for p in inp.prompts:
            for k in p.fields:
                fields.setdefault(k, [])
        for k in fields:
            fields[k] = [p.fields.get(k) for p in inp.prompts]
        where = f"batch of {n} (first prompt {inp.prompts[0].text[:60]!r})" if n else "empty batch"
        try:
            out = self.fn(
                prompts=[p.text for p in inp.prompts],
                completions=[c.text for c in inp.completions],
                completion_ended=[c.ended for c in inp.completions],
                **fields,
            )
        except Exception as exc:
            raise RunFailure(
                f"reward function {self.name} raised {type(exc).__name__}: {exc} on a {where}"
            ) from exc
        try:
            values = [float(v) for v in out]  # type: ignore[attr-defined]
        except (TypeError, ValueError) as exc:
            raise RunFailure(
                f"reward function {self.name} must return floats, one per completion; got {type(out).__name__} on a {where}"
            ) from exc
        if len(values) != n:
            raise RunFailure(
                f"reward function {self.name} returned {len(values)} values for {n} completions on a {where}"
            )
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise RunFailure(
                f"reward function {self.name} returned a non-finite value at row {bad[0]} on a {where}"
            )
        return torch.tensor(values, dtype=torch.float)


def make_callable(config: CallableConfig, ctx: BuildContext) -> CallableReward:
    """A plain Python function as the reward: reward.fn=package.module:function."""
    return CallableReward(import_function(config.fn, "fn"), config.fn)


# --------------------------------------------------------------------------------------------
# ensemble
# --------------------------------------------------------------------------------------------


@dataclass
class EnsembleConfig:
    members: list[Any] = param(
        factory=list, help="Reward-model blocks, e.g. [{name: learned, model: '@rm'}, {name: gold}]."
    )
    weights: list[float] | None = param(None, "Weights of the members (normalised); null = equal.")

    def __post_init__(self) -> None:
        if len(self.members) < 1:
            raise ValueError("members must list at least one reward-model block")
        if self.weights is not None and len(self.weights) != len(self.members):
            raise ValueError(
                f"weights must have one entry per member ({len(self.members)}), got {len(self.weights)}"
            )
        if self.weights is not None and (any(w < 0 for w in self.weights) or sum(self.weights) <= 0):
            raise ValueError("weights must be >= 0 with a positive sum")


class EnsembleReward:
    """Weighted mean of several reward models' scores."""

    def __init__(self, members: list[RewardModel], weights: list[float]) -> None:
        self.members = members
        total = sum(weights)
        self.weights = [w / total for w in weights]

    def score(self, inp: RewardInput) -> Tensor:
        return sum(w * m.score(inp).float() for w, m in zip(self.weights, self.members))  # type: ignore[return-value]

    def demo_mean(self) -> float | None:
        """The weighted mean of the members' demonstration means, when every member knows its own."""
        means = [m.demo_mean() for m in self.members]
        if any(d is None for d in means):
            return None
        return sum(w * float(d) for w, d in zip(self.weights, means))  # type: ignore[arg-type]


def make_ensemble(config: EnsembleConfig, ctx: BuildContext) -> EnsembleReward:
    """The (weighted) mean of several reward models."""
    reg = ctx.registry
    members = []
    for i, block in enumerate(config.members):
        path = f"reward.members[{i}]"
        if not isinstance(block, dict) or "name" not in block:
            raise ConfigError(f"{path}: expected a block with a 'name' key, got {block!r}")
        name = block["name"]
        if name == "ensemble":
            raise ConfigError(f"{path}.name: an ensemble cannot contain an ensemble")
        spec = reg.get("reward_model", name, f"{path}.name")
        own = {k: v for k, v in block.items() if k != "name"}
        check_keys(own, field_names(spec.config), path, f"reward_model '{name}'")
        conf = validate(spec.config, own, path) if spec.config else None
        members.append(reg.build("reward_model", name, conf, ctx))
    weights = config.weights or [1.0] * len(members)
    return EnsembleReward(members, list(weights))


@hookimpl
def register_reward_models(register: Register) -> None:
    register("gold", make_gold)
    register("callable", make_callable, config=CallableConfig)
    register("ensemble", make_ensemble, config=EnsembleConfig)
