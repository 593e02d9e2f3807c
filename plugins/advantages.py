"""Advantage estimators. All take one :class:`~instructrl.core.types.AdvantageInput` (per-token
rewards, values or ``None``, response mask, group ids, optional baseline) and return advantages
(and value targets for critic estimators). Shapes: ``(B, R)`` per token, ``(B,)`` per sequence.

Outcome estimators (rloo, grpo, remax) use the sequence return ``G_i = Σ_t r_it`` (the score plus
any per-token KL penalty) and broadcast one advantage over the response tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from instructrl.core.fields import param
from instructrl.core.hookspecs import Register, hookimpl
from instructrl.core.ops import masked_whiten
from instructrl.core.registry import BuildContext
from instructrl.core.types import AdvantageInput, AdvantageOutput, Needs
from torch import Tensor

# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), right-padded responses.

    ``δ_t = r_t + γ V_{t+1} − V_t`` with ``V`` after the last real token = 0 (the episode ends);
    ``A_t = Σ_l (γλ)^l δ_{t+l}``; returns ``G_t = A_t + V_t`` (the value targets).

    Args:
        rewards, values, mask: ``(B, R)``.
    Returns:
        ``(advantages, returns)``, both ``(B, R)`` and 0 on padding.
    """
    mask = mask.float()
    values = values.float() * mask
    rewards = rewards.float() * mask
    b, r = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(r)):
        next_value = values[:, t + 1] if t + 1 < r else torch.zeros_like(last)
        next_mask = mask[:, t + 1] if t + 1 < r else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        last = delta + gamma * lam * next_mask * last
        adv[:, t] = last * mask[:, t]
    return adv, (adv + values) * mask


def sequence_returns(rewards: Tensor, mask: Tensor) -> Tensor:
    """``(B,)`` ``G_i = Σ_t r_it`` over real tokens."""
    return (rewards.float() * mask).sum(-1)


def _group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Dense ``0..G-1`` index per row and the number of groups."""
    uniq, index = torch.unique(group_ids, return_inverse=True)
    return index, int(uniq.numel())


def _group_sums(x: Tensor, index: Tensor, n: int) -> Tensor:
    """``(G,)`` the sum of ``x`` over each group."""
    return torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, index, x)


def _group_centred(returns: Tensor, index: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """float64 returns minus their group's maximum (an exact shift: a group of equal returns becomes
    exact zeros, whatever its magnitude, so the baselines below give it an advantage of exactly 0
    instead of float32 rounding noise), and the ``(B,)`` group sizes."""
    x = returns.double()
    top = torch.zeros(n, dtype=x.dtype, device=x.device).scatter_reduce_(
        0, index, x, "amax", include_self=False
    )
    counts = _group_sums(torch.ones_like(x), index, n)[index]
    return x - top[index], counts


def rloo_advantages(returns: Tensor, group_ids: Tensor) -> Tensor:
    """Leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024):
    ``A_i = G_i − (Σ_{j∈g(i)} G_j − G_i)/(k − 1)``; in float64 around each group's maximum, so a
    group of equal returns gets exactly 0. Shape ``(B,)`` → ``(B,)`` (the dtype of ``returns``)."""
    index, n = _group_index(group_ids)
    x, k = _group_centred(returns, index, n)
    if bool((k < 2).any()):
        raise ValueError("rloo needs at least 2 samples per prompt (rollout.samples_per_prompt >= 2)")
    return (x - (_group_sums(x, index, n)[index] - x) / (k - 1)).to(returns.dtype)


def grpo_advantages(
    returns: Tensor, group_ids: Tensor, scale_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """Group-normalised advantages (Shao et al. 2024): ``(G_i − mean_g) / (std_g + eps)`` with the
    unbiased (Bessel-corrected) group std, as the reference implementations use; with
    ``scale_by_std=False`` only the mean is removed (Dr. GRPO, Liu et al. 2025). ``(B,)`` → ``(B,)``.

    A group whose returns are all equal has advantage exactly 0 for every ``eps >= 0`` (its std is
    0: ``0 / (0 + eps)``, also when ``eps = 0``); statistics are float64 around the group's maximum
    (without the shift, the float32 mean of four 1000.1 is off by an ulp and ``eps = 0`` gives ±1)."""
    index, n = _group_index(group_ids)
    x, k = _group_centred(returns, index, n)
    if bool((k < 2).any()):
        raise ValueError("grpo needs at least 2 samples per prompt (rollout.samples_per_prompt >= 2)")
    centred = x - _group_sums(x, index, n)[index] / k
    if not scale_by_std:
        return centred.to(returns.dtype)
    std = (_group_sums(centred**2, index, n)[index] / (k - 1)).sqrt()
    scaled = centred / torch.where(std > 0, std + eps, 1.0)
    return torch.where(std > 0, scaled, 0.0).to(returns.dtype)


def whiten64(x: Tensor, mask: Tensor) -> Tensor:
    """:func:`~instructrl.core.ops.masked_whiten` (global across processes) in float64, returned in
    ``x``'s dtype. In float32 the mean of many equal values is off by an ulp that ``1/sqrt(0 + eps)``
    amplifies (equal returns-to-go of 1000.1 whitened to -0.51, not 0); one token whitens to 0."""
    return masked_whiten(x.double(), mask.double()).to(x.dtype)


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """``(B, R)`` returns-to-go ``G_t = Σ_{s≥t} γ^{s−t} r_s`` over real tokens."""
    rewards = rewards.float() * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        out[:, t] = running
    return out * mask


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------


@dataclass
class GAEConfig:
    gamma: float = param(1.0, "Discount γ (InstructGPT / lm-human-preferences: 1).")
    lam: float = param(0.95, "GAE λ (lm-human-preferences: 0.95).")
    whiten: bool = param(
        True, "Whiten advantages over the batch's response tokens (global across processes)."
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1] (got {self.gamma})")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1] (got {self.lam})")


class GAE:
    """GAE with whitening; registered with ``Needs(values=True)``."""

    def __init__(self, config: GAEConfig) -> None:
        self.config = config

    def __call__(self, inp: AdvantageInput) -> AdvantageOutput:
        if inp.values is None:
            raise ValueError("gae needs values from a value model")
        adv, returns = gae(inp.rewards, inp.values, inp.mask, self.config.gamma, self.config.lam)
        if self.config.whiten:
            adv = whiten64(adv, inp.mask)
        return AdvantageOutput(adv, returns)


@dataclass
class RLOOConfig:
    whiten: bool = param(False, "Whiten the advantages over the batch afterwards.")


class OutcomeEstimator:
    """A critic-free estimator with one advantage per sequence, broadcast over its tokens.

    ``baseline_fn(inp, returns)`` maps the ``(B,)`` sequence returns to ``(B,)`` advantages.
    """

    def __init__(
        self, baseline_fn: Callable[[AdvantageInput, Tensor], Tensor], *, whiten: bool = False
    ) -> None:
        self.baseline_fn = baseline_fn
        self.whiten = whiten

    def __call__(self, inp: AdvantageInput) -> AdvantageOutput:
        returns = sequence_returns(inp.rewards, inp.mask)
        adv = self.baseline_fn(inp, returns).unsqueeze(-1) * inp.mask
        if self.whiten:
            adv = whiten64(adv, inp.mask)
        return AdvantageOutput(adv, None)


@dataclass
class GRPOConfig:
    scale_by_std: bool = param(True, "Divide by the group std (false = Dr. GRPO).")
    eps: float = param(1e-6, "Added to the group std.")

    def __post_init__(self) -> None:
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0 (got {self.eps})")


def remax_advantages(returns: Tensor, baseline: Tensor | None) -> Tensor:
    """ReMax (Li et al. 2023): ``A_i = G_i − b_i`` with ``b_i`` the greedy response's reward. ``(B,)``."""
    if baseline is None:
        raise ValueError(
            "remax needs AdvantageInput.baseline: the reward of the greedy response to each prompt"
        )
    return returns - baseline.float()


@dataclass
class ReinforcePPConfig:
    gamma: float = param(1.0, "Discount of the per-token returns-to-go.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1] (got {self.gamma})")


class ReinforcePP:
    """REINFORCE++ returns-to-go, whitened."""

    def __init__(self, config: ReinforcePPConfig) -> None:
        self.config = config

    def __call__(self, inp: AdvantageInput) -> AdvantageOutput:
        returns = discounted_returns(inp.rewards, inp.mask, self.config.gamma)
        return AdvantageOutput(whiten64(returns, inp.mask), None)


def make_gae(config: GAEConfig, ctx: BuildContext) -> GAE:
    """GAE(γ, λ) with a learned value model; whitened (PPO, InstructGPT)."""
    return GAE(config)


def make_rloo(config: RLOOConfig, ctx: BuildContext) -> OutcomeEstimator:
    """REINFORCE leave-one-out: baseline = mean return of the prompt's other samples."""
    return OutcomeEstimator(lambda inp, g: rloo_advantages(g, inp.group_ids), whiten=config.whiten)


def make_grpo(config: GRPOConfig, ctx: BuildContext) -> OutcomeEstimator:
    """GRPO group normalisation (mean/std of the prompt's samples; Dr. GRPO without std)."""
    return OutcomeEstimator(lambda inp, g: grpo_advantages(g, inp.group_ids, config.scale_by_std, config.eps))


def make_reinforce_pp(config: ReinforcePPConfig, ctx: BuildContext) -> ReinforcePP:
    """REINFORCE++: per-token returns-to-go, whitened over the whole batch."""
    return ReinforcePP(config)


def make_remax(config: None, ctx: BuildContext) -> OutcomeEstimator:
    """ReMax: baseline = the reward of the greedy response to the same prompt."""
    return OutcomeEstimator(lambda inp, g: remax_advantages(g, inp.baseline))


GROUP = Needs(min_samples_per_prompt=2, default_samples_per_prompt=4)


@hookimpl
def register_advantage_estimators(register: Register) -> None:
    register("gae", make_gae, config=GAEConfig, needs=Needs(values=True))
    register("rloo", make_rloo, config=RLOOConfig, needs=GROUP)
    register("grpo", make_grpo, config=GRPOConfig, needs=GROUP)
    register("reinforce_pp", make_reinforce_pp, config=ReinforcePPConfig)
    register("remax", make_remax, needs=Needs(greedy_baseline=True))
