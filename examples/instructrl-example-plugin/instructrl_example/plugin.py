"""Five components, registered through instructrl's hooks exactly as the built-ins are (plugin API v1).

- KL estimator ``k3_clamped``: Schulman's k3 = e^{−Δ} + Δ − 1, clamped to ``[0, max_value]``
  (verl's "low_var_kl"): bounded when the policy puts much less mass than the reference on a
  sampled token (Δ ≪ 0 makes e^{−Δ} explode).
- Advantage estimator ``batch_mean``: REINFORCE with the batch-average return as the baseline
  (Williams 1992): ``A_i = G_i − mean_j G_j``, broadcast over the response tokens.
- Extra loss ``entropy_bonus``: ``−coef · mean_i H̄_i`` where ``H̄_i`` is sequence ``i``'s mean
  per-token entropy (an entropy bonus, Williams & Peng 1991; Mnih et al. 2016), exact under
  gradient accumulation.
- Reward transform ``group_rank``: per-prompt centred ranks in ``[−scale, scale]`` (rank-based
  fitness shaping, Wierstra et al. 2014; Salimans et al. 2017), applied within each prompt's group.
- KL controller ``quantile_kl``: Ziegler et al.'s (2019) adaptive β, driven by the ``quantile``-th
  quantile of the per-sequence KL instead of its mean (it reacts to the tail of drifting samples).

Each component is a pure function (the maths, tested by hand) plus a thin class that reads the
kind's input container. Everything comes from the one public module ``instructrl.core.plugin_api``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from instructrl.core import plugin_api as api
from torch import Tensor

if api.API_VERSION != 1:  # a broken plugin (listed by `instructrl plugins`), not a silent misfit
    raise ImportError(
        f"instructrl-example-plugin supports instructrl plugin API v1; this instructrl has v{api.API_VERSION}"
    )

# --------------------------------------------------------------------------------------------
# k3_clamped (kl_estimator)
# --------------------------------------------------------------------------------------------


def k3_clamped(logprobs: Tensor, ref_logprobs: Tensor, max_value: float) -> Tensor:
    """Per-token ``clamp(e^{−Δ} + Δ − 1, 0, max_value)`` with ``Δ = log π − log π_ref``.

    Shape: ``(B, R)`` in, ``(B, R)`` out (unmasked; the caller multiplies by the response mask).
    """
    delta = logprobs - ref_logprobs
    return (torch.exp(-delta) + delta - 1).clamp(0.0, max_value)


@dataclass
class K3ClampedConfig:
    max_value: float = api.param(10.0, "Upper clamp of the per-token estimate (verl uses 10).")

    def __post_init__(self) -> None:
        api.positive(self, "max_value")


class K3Clamped:
    """Reads only the sampled tokens' logprobs (registered without ``Needs(logits=True)``)."""

    def __init__(self, max_value: float) -> None:
        self.max_value = max_value

    def __call__(self, inp: api.KLInput) -> Tensor:
        return k3_clamped(inp.logprobs, inp.ref_logprobs, self.max_value)


def make_k3_clamped(config: K3ClampedConfig, ctx: api.BuildContext) -> K3Clamped:
    """k3 clamped to [0, max_value] (low-variance KL, as in verl)."""
    return K3Clamped(config.max_value)


# --------------------------------------------------------------------------------------------
# batch_mean (advantage)
# --------------------------------------------------------------------------------------------


def batch_mean_advantages(rewards: Tensor, mask: Tensor) -> Tensor:
    """``A_i = G_i − mean(G)`` with ``G_i = Σ_t r_it``, broadcast over real tokens (the mean is
    global over processes).

    Shape: ``rewards, mask: (B, R)`` → ``(B, R)``.
    """
    returns = (rewards * mask).sum(-1)  # (B,)
    baseline = api.masked_mean(returns, torch.ones_like(returns), global_=True)
    return (returns - baseline).unsqueeze(-1) * mask


class BatchMean:
    """Critic-free, one sample per prompt is enough (the defaults of ``Needs``)."""

    def __call__(self, inp: api.AdvantageInput) -> api.AdvantageOutput:
        return api.AdvantageOutput(batch_mean_advantages(inp.rewards, inp.mask), None)


def make_batch_mean(config: None, ctx: api.BuildContext) -> BatchMean:
    """REINFORCE with the batch-average return as baseline (critic-free)."""
    return BatchMean()


# --------------------------------------------------------------------------------------------
# entropy_bonus (extra_loss)
# --------------------------------------------------------------------------------------------


def sequence_mean_entropy(entropy: Tensor, mask: Tensor) -> Tensor:
    """Each sequence's mean per-token entropy ``H̄_i = Σ_t H_it m_it / max(Σ_t m_it, 1)``.

    Shape: ``entropy, mask: (b, R)`` → ``(b,)``; a row without real tokens gets 0.
    """
    mask = mask.to(entropy.dtype)
    return (entropy * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def entropy_bonus_loss(entropy: Tensor, mask: Tensor, coef: float, share: float) -> Tensor:
    """``−coef · share · mean_i H̄_i`` over the ``b`` rows of one micro-batch: a scalar.

    With ``share = b / M`` (the micro-batch's fraction of its minibatch's ``M`` rows) this is
    ``−coef · (1/M) Σ_{i ∈ micro-batch} H̄_i``, so the micro-batch terms of a minibatch sum
    *exactly* to ``−coef · mean over the minibatch of H̄_i``: the gradient is exact under gradient
    accumulation. (A token-weighted mean ``Σ H m / Σ m`` over the minibatch would need the
    minibatch's token count, which a micro-batch does not see: ``share`` counts rows, not tokens,
    so ``share · token-mean(micro-batch)`` is only exact when every micro-batch has the same
    tokens per row.)

    Shape: ``entropy, mask: (b, R)`` → ``()``.
    """
    return -coef * share * sequence_mean_entropy(entropy, mask).mean()


@dataclass
class EntropyBonusConfig:
    coef: float = api.param(
        0.01, "Weight of the bonus (loss −coef · mean sequence entropy, nats/token); 0 switches it off."
    )

    def __post_init__(self) -> None:
        if self.coef < 0:
            raise ValueError(f"coef must be >= 0 (got {self.coef})")


class EntropyBonus:
    """The bonus on the rollout tokens of each micro-batch, weighted by the micro-batch's share."""

    def __init__(self, coef: float) -> None:
        self.coef = coef

    def __call__(self, inp: api.ExtraLossInput) -> api.LossOutput:
        entropy, mask = inp.output.entropy, inp.batch.response_mask
        loss = entropy_bonus_loss(entropy, mask, self.coef, inp.share)
        mean_h = sequence_mean_entropy(entropy.detach(), mask).mean()
        return api.LossOutput(loss, {"entropy": api.scalar(mean_h)})


def make_entropy_bonus(config: EntropyBonusConfig, ctx: api.BuildContext) -> EntropyBonus:
    """Entropy bonus −coef·(mean per-sequence entropy), exact under gradient accumulation."""
    return EntropyBonus(config.coef)


# --------------------------------------------------------------------------------------------
# group_rank (reward_transform)
# --------------------------------------------------------------------------------------------


def group_centred_ranks(scores: Tensor, group_ids: Tensor) -> Tensor:
    """Within each group, scores → centred ranks in ``[−1, 1]``.

    For sequence ``i`` in a group of ``n``: ``rank_i = #{j: s_j < s_i} + (#{j: s_j = s_i} − 1)/2``
    (0-based; ties share the mean of their ranks), and the output is ``2·rank_i/(n − 1) − 1``; a
    group of one gets 0. Each group's outputs sum to 0.

    Shape: ``scores, group_ids: (B,)`` → ``(B,)`` float.
    """
    s = scores.float()
    same = group_ids.reshape(-1, 1) == group_ids.reshape(1, -1)  # (B, B)
    below = (same & (s.reshape(1, -1) < s.reshape(-1, 1))).sum(-1).float()
    ties = (same & (s.reshape(1, -1) == s.reshape(-1, 1))).sum(-1).float()  # includes i itself
    n = same.sum(-1).float()
    rank = below + (ties - 1) / 2
    return torch.where(n > 1, 2 * rank / (n - 1).clamp_min(1.0) - 1, torch.zeros_like(s))


@dataclass
class GroupRankConfig:
    scale: float = api.param(1.0, "Ranks map to [−scale, scale] (best sample of a prompt: +scale).")

    def __post_init__(self) -> None:
        api.positive(self, "scale")


class GroupRank:
    """Rank normalisation per prompt (all samples of a prompt are on one process, so no sync)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, inp: api.TransformInput) -> Tensor:
        return self.scale * group_centred_ranks(inp.scores, inp.group_ids)


def make_group_rank(config: GroupRankConfig, ctx: api.BuildContext) -> GroupRank:
    """Per-prompt centred ranks in [−scale, scale] (ties share their mean rank)."""
    return GroupRank(config.scale)


# --------------------------------------------------------------------------------------------
# quantile_kl (kl_controller)
# --------------------------------------------------------------------------------------------


def quantile_kl_update(
    coef: float, kl: Tensor, quantile: float, target: float, horizon: int, n_steps: int
) -> float:
    """Ziegler et al.'s (2019) proportional controller on a quantile of the per-sequence KL:
    ``q = quantile_q(kl)`` (linear interpolation), ``e = clip(q/target − 1, −0.2, 0.2)``,
    ``β ← β·(1 + e·n_steps/horizon)``.

    Shape: ``kl: (B,)`` (nats per sequence) → a float; ``β`` is unchanged when ``kl`` is empty.
    """
    if kl.numel() == 0:
        return coef
    q = float(torch.quantile(kl.detach().double().reshape(-1), quantile))
    error = min(max(q / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)


@dataclass
class QuantileKLConfig:
    coef: float = api.param(0.02, "Initial β.")
    target: float = api.param(6.0, "Target for the quantile of the per-sequence KL, nats summed over tokens.")
    quantile: float = api.param(0.9, "Which quantile of the per-sequence KL tracks the target (1 = the max).")
    horizon: int = api.param(10000, "Episodes over which β moves by at most 20 % per unit error.")

    def __post_init__(self) -> None:
        if self.coef < 0:
            raise ValueError(f"coef must be >= 0 (got {self.coef})")
        api.positive(self, "target", "horizon")
        if not 0.0 <= self.quantile <= 1.0:
            raise ValueError(f"quantile must be in [0, 1] (got {self.quantile})")


class QuantileKL:
    """β adapted so that the ``quantile`` of the per-sequence KL tracks ``target``. The
    per-sequence KL of ``ControllerInput.kl`` is this process's; it is gathered from every process
    first, so every rank computes the same β."""

    def __init__(self, config: QuantileKLConfig) -> None:
        self.config = config
        self._coef = float(config.coef)

    @property
    def coef(self) -> float:
        return self._coef

    def update(self, inp: api.ControllerInput) -> None:
        kl = api.all_gather(inp.kl.detach().float())
        c = self.config
        self._coef = quantile_kl_update(self._coef, kl, c.quantile, c.target, c.horizon, inp.n_episodes)

    def state_dict(self) -> dict[str, object]:
        return {"coef": self._coef}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self._coef = float(state["coef"])  # type: ignore[arg-type]


def make_quantile_kl(config: QuantileKLConfig, ctx: api.BuildContext) -> QuantileKL:
    """β adapted so a quantile of the per-sequence KL tracks kl.target (Ziegler et al. 2019)."""
    return QuantileKL(config)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


@api.hookimpl
def register_kl_estimators(register: api.Register) -> None:
    register("k3_clamped", make_k3_clamped, config=K3ClampedConfig)


@api.hookimpl
def register_advantage_estimators(register: api.Register) -> None:
    register("batch_mean", make_batch_mean, needs=api.Needs(values=False, min_samples_per_prompt=1))


@api.hookimpl
def register_extra_losses(register: api.Register) -> None:
    register("entropy_bonus", make_entropy_bonus, config=EntropyBonusConfig)


@api.hookimpl
def register_reward_transforms(register: api.Register) -> None:
    register("group_rank", make_group_rank, config=GroupRankConfig)


@api.hookimpl
def register_kl_controllers(register: api.Register) -> None:
    register("quantile_kl", make_quantile_kl, config=QuantileKLConfig)
