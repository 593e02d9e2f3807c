"""Reward transforms: per-sequence scores → per-sequence scores, applied in the order of the
``reward_transforms`` list before the per-token KL penalty is added. Shapes: ``(B,)``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from instructrl.core.fields import param
from instructrl.core.hookspecs import Register, hookimpl
from instructrl.core.ops import all_reduce_sum, masked_whiten
from instructrl.core.registry import BuildContext
from instructrl.core.types import Needs, TransformInput
from torch import Tensor

# --------------------------------------------------------------------------------------------
# demo_bias / gain_bias: fixed affine maps calibrated once at start
# --------------------------------------------------------------------------------------------


class Affine:
    """``s ↦ gain·s + bias``."""

    def __init__(self, gain: float, bias: float) -> None:
        self.gain, self.bias = float(gain), float(bias)

    def __call__(self, inp: TransformInput) -> Tensor:
        return self.gain * inp.scores + self.bias


@dataclass
class DemoBiasConfig:
    bias: float | None = param(
        None, "Subtracted from every score; null = the RM's mean score on the SFT demonstrations."
    )


def make_demo_bias(config: DemoBiasConfig, ctx: BuildContext) -> Affine:
    """InstructGPT: shift scores so the labeler demonstrations score 0 on average."""
    if config.bias is not None:
        return Affine(1.0, -config.bias)
    known = ctx.reward_model.demo_mean() if ctx.reward_model is not None else None
    if known is not None:
        return Affine(1.0, -float(known))
    score = ctx.score_demonstrations
    if score is None:
        raise ValueError(
            "demo_bias needs the reward model's demonstration statistics or a way to score the demonstrations"
        )
    scores = score()
    if scores.numel() == 0:
        raise ValueError(
            "demo_bias: the task has no demonstrations to calibrate on; set reward_transforms[i].bias"
        )
    return Affine(1.0, -float(scores.float().mean()))


@dataclass
class GainBiasConfig:
    n_samples: int = param(256, "Reference-policy samples used to fit the gain and bias.")
    target_mean: float = param(0.0, "Mean of the reference samples' scores after the transform.")
    target_std: float = param(1.0, "Std of the reference samples' scores after the transform.")

    def __post_init__(self) -> None:
        if self.n_samples < 2:
            raise ValueError(f"n_samples must be >= 2 (got {self.n_samples})")
        if self.target_std <= 0:
            raise ValueError(f"target_std must be > 0 (got {self.target_std})")


def fit_gain_bias(scores: Tensor, target_mean: float, target_std: float) -> tuple[float, float]:
    """Gain and bias mapping ``scores`` to mean ``target_mean`` and std ``target_std``."""
    mean, std = float(scores.float().mean()), float(scores.float().std())
    gain = target_std / max(std, 1e-8)
    return gain, target_mean - gain * mean


def make_gain_bias(config: GainBiasConfig, ctx: BuildContext) -> Affine:
    """lm-human-preferences: normalise so reference-policy samples score N(target_mean, target_std²)."""
    sample = ctx.score_reference_samples
    if sample is None:
        raise ValueError(
            "gain_bias needs a way to score reference-policy samples (only available in the RL stage)"
        )
    gain, bias = fit_gain_bias(sample(config.n_samples), config.target_mean, config.target_std)
    return Affine(gain, bias)


# --------------------------------------------------------------------------------------------
# whitening
# --------------------------------------------------------------------------------------------


@dataclass
class WhitenConfig:
    shift_mean: bool = param(
        True, "Subtract the batch mean (false: scale by the std only, keeping the mean)."
    )


class Whiten:
    """Per-batch whitening (statistics global across processes)."""

    def __init__(self, shift_mean: bool) -> None:
        self.shift_mean = shift_mean

    def __call__(self, inp: TransformInput) -> Tensor:
        return masked_whiten(
            inp.scores.float(), torch.ones_like(inp.scores, dtype=torch.float), shift_mean=self.shift_mean
        )


def make_whiten(config: WhitenConfig, ctx: BuildContext) -> Whiten:
    """Whiten the scores of each batch (optionally keeping the mean)."""
    return Whiten(config.shift_mean)


@dataclass
class RunningWhitenConfig:
    shift_mean: bool = param(True, "Subtract the running mean (false: scale only).")
    eps: float = param(1e-8, "Added to the running variance.")


def merge_moments(count: float, mean: float, m2: float, batch: Tensor) -> tuple[float, float, float]:
    """Chan et al.'s parallel update of (count, mean, M2) with a batch, global across processes."""
    stats = all_reduce_sum(
        torch.stack([batch.float().sum(), (batch.float() ** 2).sum(), torch.tensor(float(batch.numel()))])
    )
    n_b = float(stats[2])
    if n_b == 0:
        return count, mean, m2
    mean_b = float(stats[0]) / n_b
    m2_b = float(stats[1]) - n_b * mean_b * mean_b
    total = count + n_b
    delta = mean_b - mean
    new_mean = mean + delta * n_b / total
    new_m2 = m2 + m2_b + delta * delta * count * n_b / total
    return total, new_mean, new_m2


class RunningWhiten:
    """Whitening with the running mean/std of every rollout score seen so far (stateful and
    checkpointed; a baseline batch is whitened with the current statistics but does not update them)."""

    def __init__(self, config: RunningWhitenConfig) -> None:
        self.config = config
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    @property
    def var(self) -> float:
        return self.m2 / (self.count - 1) if self.count > 1 else 1.0

    def __call__(self, inp: TransformInput) -> Tensor:
        if not inp.is_baseline:
            self.count, self.mean, self.m2 = merge_moments(self.count, self.mean, self.m2, inp.scores)
        std = (self.var + self.config.eps) ** 0.5
        if self.config.shift_mean:
            return (inp.scores - self.mean) / std
        return inp.scores / std

    def state_dict(self) -> dict[str, object]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.count, self.mean, self.m2 = (float(state[k]) for k in ("count", "mean", "m2"))  # type: ignore[arg-type]


def make_running_whiten(config: RunningWhitenConfig, ctx: BuildContext) -> RunningWhiten:
    """Whiten with the running mean/std of all scores so far."""
    return RunningWhiten(config)


# --------------------------------------------------------------------------------------------
# clip / penalties
# --------------------------------------------------------------------------------------------


@dataclass
class ClipConfig:
    low: float = param(-5.0, "Lower bound.")
    high: float = param(5.0, "Upper bound.")

    def __post_init__(self) -> None:
        if self.low >= self.high:
            raise ValueError(f"low must be < high (got low={self.low}, high={self.high})")


class Clip:
    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high

    def __call__(self, inp: TransformInput) -> Tensor:
        return inp.scores.clamp(self.low, self.high)


def make_clip(config: ClipConfig, ctx: BuildContext) -> Clip:
    """Clamp scores to [low, high]."""
    return Clip(config.low, config.high)


@dataclass
class MissingEOSConfig:
    penalty: float = param(
        -1.0,
        "Score given to (replace) or added to (add) a response truncated without EOS (lm-human-preferences: -1).",
    )
    mode: Literal["replace", "add"] = param("replace", "replace the score, or add the penalty to it.")


class MissingEOSPenalty:
    def __init__(self, config: MissingEOSConfig) -> None:
        self.config = config

    def __call__(self, inp: TransformInput) -> Tensor:
        penalised = (
            torch.full_like(inp.scores, self.config.penalty)
            if self.config.mode == "replace"
            else inp.scores + self.config.penalty
        )
        return torch.where(inp.ended.bool(), inp.scores, penalised)


def make_missing_eos_penalty(config: MissingEOSConfig, ctx: BuildContext) -> MissingEOSPenalty:
    """Penalise responses that hit max_new_tokens without the end token."""
    return MissingEOSPenalty(config)


@dataclass
class LengthPenaltyConfig:
    coef: float = param(0.01, "Subtracted per response token.")

    def __post_init__(self) -> None:
        if self.coef < 0:
            raise ValueError(f"coef must be >= 0 (got {self.coef})")


class LengthPenalty:
    def __init__(self, coef: float) -> None:
        self.coef = coef

    def __call__(self, inp: TransformInput) -> Tensor:
        return inp.scores - self.coef * inp.lengths.float()


def make_length_penalty(config: LengthPenaltyConfig, ctx: BuildContext) -> LengthPenalty:
    """Subtract coef × response length (tokens)."""
    return LengthPenalty(config.coef)


@hookimpl
def register_reward_transforms(register: Register) -> None:
    register("demo_bias", make_demo_bias, config=DemoBiasConfig)
    register("gain_bias", make_gain_bias, config=GainBiasConfig)
    register("whiten", make_whiten, config=WhitenConfig)
    register("running_whiten", make_running_whiten, config=RunningWhitenConfig, needs=Needs(stateful=True))
    register("clip", make_clip, config=ClipConfig)
    register("missing_eos_penalty", make_missing_eos_penalty, config=MissingEOSConfig)
    register("length_penalty", make_length_penalty, config=LengthPenaltyConfig)
