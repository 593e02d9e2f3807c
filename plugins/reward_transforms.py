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
    """Gain and bias mapping ``scores`` to mean ``target_mean`` and std ``target_std``.

    The std is the **population** std (``unbiased=False``), as lm-human-preferences computes it;
    moments in float64. When every score is the same (std 0) there is no spread to scale: the gain
    is 1 and only the bias moves the mean to ``target_mean`` (a gain of ``target_std / ~0`` would
    blow every later score up). Non-finite scores are an error."""
    x = scores.detach().double().reshape(-1)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("gain_bias: the reference samples' reward-model scores are not all finite")
    mean, std = float(x.mean()), float(x.std(unbiased=False))
    constant = bool(x.max() == x.min())  # exact: a float64 mean of equal values can leave a ~1e-16 "std"
    gain = 1.0 if constant else target_std / std
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
    """Per-batch whitening (statistics global across processes), computed in float64: in float32
    the batch mean of equal scores is off by an ulp, which ``1/sqrt(0 + eps)`` blows up (a batch of
    seven 1000.1 became -0.51 each, not 0). A batch of one whitens to 0 (to itself with ``shift_mean=False``)."""

    def __init__(self, shift_mean: bool) -> None:
        self.shift_mean = shift_mean

    def __call__(self, inp: TransformInput) -> Tensor:
        x = inp.scores.double()
        return masked_whiten(x, torch.ones_like(x), shift_mean=self.shift_mean).float()


def make_whiten(config: WhitenConfig, ctx: BuildContext) -> Whiten:
    """Whiten the scores of each batch (optionally keeping the mean)."""
    return Whiten(config.shift_mean)


@dataclass
class RunningWhitenConfig:
    shift_mean: bool = param(True, "Subtract the running mean (false: scale only).")
    eps: float = param(1e-8, "Added to the running variance.")

    def __post_init__(self) -> None:
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0 (got {self.eps})")


def merge_moments(count: float, mean: float, m2: float, batch: Tensor) -> tuple[float, float, float]:
    """Chan et al.'s parallel update of (count, mean, M2) with a batch, global across processes.

    Everything is float64 and two-pass, so a large mean with a tiny spread keeps its variance: the
    global count and sum give the global batch mean ``mean_b``, then the global ``Σ (x − mean_b)²`` is
    the batch's exact M2 (no ``Σx² − n·mean²`` cancellation, which went negative and made the std
    complex). Two all-reduces; M2 is clamped at 0."""
    x = batch.detach().double().reshape(-1)
    head = all_reduce_sum(
        torch.stack([x.sum(), torch.tensor(float(x.numel()), dtype=x.dtype, device=x.device)])
    )
    n_b = float(head[1])
    if n_b == 0:
        return count, mean, m2
    mean_b = float(head[0]) / n_b
    m2_b = max(float(all_reduce_sum(((x - mean_b) ** 2).sum())), 0.0)
    total = count + n_b
    delta = mean_b - mean
    new_mean = mean + delta * n_b / total
    new_m2 = m2 + m2_b + delta * delta * count * n_b / total
    return total, new_mean, max(new_m2, 0.0)


class RunningWhiten:
    """Whitening with the running mean/std of every rollout score seen so far (stateful and
    checkpointed; a baseline batch is whitened with the current statistics but does not update them).
    Statistics and the whitening are float64; with fewer than two scores seen the variance is 1, and
    when every score seen so far is equal (std 0, with ``eps = 0``) the scores are only shifted."""

    def __init__(self, config: RunningWhitenConfig) -> None:
        self.config = config
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    @property
    def var(self) -> float:
        return max(self.m2, 0.0) / (self.count - 1) if self.count > 1 else 1.0

    def __call__(self, inp: TransformInput) -> Tensor:
        if not inp.is_baseline:
            self.count, self.mean, self.m2 = merge_moments(self.count, self.mean, self.m2, inp.scores)
        std = (self.var + self.config.eps) ** 0.5
        std = std if std > 0 else 1.0
        x = inp.scores.double()
        out = (x - self.mean) / std if self.config.shift_mean else x / std
        return out.to(inp.scores.dtype)

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
