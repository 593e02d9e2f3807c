"""Policy objectives: per-token losses the RL stage aggregates with the objective's
``aggregation`` mode (see :func:`instructrl.core.ops.aggregate`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from instructrl.core.fields import param
from instructrl.core.hookspecs import Register, hookimpl
from instructrl.core.ops import Aggregation, masked_mean
from instructrl.core.registry import BuildContext
from instructrl.core.types import LossOutput, ObjectiveInput
from torch import Tensor


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Clipped surrogate (Schulman et al. 2017), per token.

    ``r = exp(log π − log π_old)``; ``loss = max(−A·r, −A·clip(r, 1 − ε_low, 1 + ε_high))``; with
    dual clip ``c`` (Ye et al. 2020), for ``A < 0``: ``loss = min(loss, −c·A)``.

    Shape: all ``(B, R)``. Returns ``(loss, clipped)`` where ``clipped`` marks tokens whose loss
    comes from a clipped branch.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    if dual_clip is not None:
        cap = -dual_clip * advantages
        dual = (advantages < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
        is_clipped = is_clipped | dual
    return loss, is_clipped


def ratio_metrics(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """``approx_kl`` (mean of ``(r − 1) − log r``), ``ratio_mean`` and ``ratio_max_dev``."""
    log_ratio = (logprobs - old_logprobs).detach() * mask
    ratio = log_ratio.exp()
    return {
        "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_max_dev": ((ratio - 1).abs() * mask).max(),
    }


@dataclass
class PPOClipConfig:
    clip: float = param(
        0.2, "Clip range ε (lower, and upper unless clip_high is set; InstructGPT / PPO: 0.2)."
    )
    clip_high: float | None = param(None, "Upper clip range (DAPO's clip-higher); null = clip.")
    dual_clip: float | None = param(
        None, "Dual-clip constant c > 1 bounding the loss for negative advantages; null = off."
    )
    aggregation: Aggregation = param("token_mean", "How per-token losses are reduced.")

    def __post_init__(self) -> None:
        if self.clip <= 0:
            raise ValueError(f"clip must be > 0 (got {self.clip})")
        if self.clip_high is not None and self.clip_high <= 0:
            raise ValueError(f"clip_high must be > 0 or null (got {self.clip_high})")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 or null (got {self.dual_clip})")


class PPOClip:
    def __init__(self, config: PPOClipConfig) -> None:
        self.config = config
        self.aggregation = config.aggregation

    def __call__(self, inp: ObjectiveInput) -> LossOutput:
        c = self.config
        high = c.clip if c.clip_high is None else c.clip_high
        loss, clipped = ppo_clip_loss(
            inp.logprobs, inp.old_logprobs, inp.advantages, c.clip, high, c.dual_clip
        )
        metrics = {
            "clip_frac": masked_mean(clipped.float(), inp.mask),
            **ratio_metrics(inp.logprobs, inp.old_logprobs, inp.mask),
        }
        return LossOutput(loss * inp.mask, metrics)


@dataclass
class PGConfig:
    aggregation: Aggregation = param("token_mean", "How per-token losses are reduced.")


class PolicyGradient:
    def __init__(self, config: PGConfig) -> None:
        self.aggregation = config.aggregation

    def __call__(self, inp: ObjectiveInput) -> LossOutput:
        loss = -inp.advantages * inp.logprobs
        metrics = {"clip_frac": torch.zeros(()), **ratio_metrics(inp.logprobs, inp.old_logprobs, inp.mask)}
        return LossOutput(loss * inp.mask, metrics)


def make_ppo_clip(config: PPOClipConfig, ctx: BuildContext) -> PPOClip:
    """PPO's clipped surrogate (asymmetric and dual clip optional)."""
    return PPOClip(config)


def make_pg(config: PGConfig, ctx: BuildContext) -> PolicyGradient:
    """Vanilla policy gradient: −A · log π (Williams 1992)."""
    return PolicyGradient(config)


@hookimpl
def register_objectives(register: Register) -> None:
    register("ppo_clip", make_ppo_clip, config=PPOClipConfig)
    register("pg", make_pg, config=PGConfig)
