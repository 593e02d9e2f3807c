"""Two components, registered through instructrl's hooks exactly as the built-ins are.

- KL estimator ``k3_clamped``: Schulman's k3 = e^{−Δ} + Δ − 1, clamped to ``[0, max_value]``
  (verl's "low_var_kl"): bounded when the policy puts much less mass than the reference on a
  sampled token (Δ ≪ 0 makes e^{−Δ} explode).
- Advantage estimator ``batch_mean``: REINFORCE with the batch-average return as the baseline
  (Williams 1992): ``A_i = G_i − mean_j G_j``, broadcast over the response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from instructrl.core.hookspecs import hookimpl
from instructrl.core.ops import masked_mean
from instructrl.core.types import AdvantageInput, AdvantageOutput, KLInput
from torch import Tensor


def k3_clamped(logprobs: Tensor, ref_logprobs: Tensor, max_value: float) -> Tensor:
    """Per-token ``clamp(e^{−Δ} + Δ − 1, 0, max_value)`` with ``Δ = log π − log π_ref``.

    Shape: ``(B, R)`` in, ``(B, R)`` out.
    """
    delta = logprobs - ref_logprobs
    return (torch.exp(-delta) + delta - 1).clamp(0.0, max_value)


@dataclass
class K3ClampedConfig:
    max_value: float = field(
        default=10.0, metadata={"help": "Upper clamp of the per-token estimate (verl uses 10)."}
    )

    def __post_init__(self) -> None:
        if self.max_value <= 0:
            raise ValueError(f"max_value must be > 0 (got {self.max_value})")


class K3Clamped:
    needs_logits = False

    def __init__(self, max_value: float) -> None:
        self.max_value = max_value

    def __call__(self, inp: KLInput) -> Tensor:
        return k3_clamped(inp.logprobs, inp.ref_logprobs, self.max_value)


def make_k3_clamped(config: K3ClampedConfig, ctx: Any) -> K3Clamped:
    """k3 clamped to [0, max_value] (low-variance KL, as in verl)."""
    return K3Clamped(config.max_value)


def batch_mean_advantages(rewards: Tensor, mask: Tensor) -> Tensor:
    """``A_i = G_i − mean(G)`` with ``G_i = Σ_t r_it``, broadcast over real tokens.

    Shape: ``rewards, mask: (B, R)`` → ``(B, R)``.
    """
    returns = (rewards * mask).sum(-1)  # (B,)
    baseline = masked_mean(returns, torch.ones_like(returns), global_=True)
    return (returns - baseline).unsqueeze(-1) * mask


class BatchMean:
    needs_values = False
    min_samples_per_prompt = 1
    default_samples_per_prompt = 1
    needs_greedy_baseline = False

    def __call__(self, inp: AdvantageInput) -> AdvantageOutput:
        return AdvantageOutput(batch_mean_advantages(inp.rewards, inp.mask), None)


def make_batch_mean(config: None, ctx: Any) -> BatchMean:
    """REINFORCE with the batch-average return as baseline (critic-free)."""
    return BatchMean()


@hookimpl
def register_kl_estimators(register: Any) -> None:
    register("k3_clamped", make_k3_clamped, config=K3ClampedConfig)


@hookimpl
def register_advantage_estimators(register: Any) -> None:
    register("batch_mean", make_batch_mean)
