"""One RL iteration, top to bottom: :func:`experience` (steps 1–5, no gradients) and :func:`micro_batch_loss`
(step 6 on one micro-batch), called from ``rl.py``'s Lightning hooks; the maths is pure functions.

    1. rollout      prompts → responses (+ logprobs at sampling temperature)
    2. score        reward model(prompt, response) → scalar at the last real token
    3. reference    old logprobs, reference logprobs, values
    4. shape        reward transforms; the per-token KL penalty if placement=reward
    5. advantages   estimator(rewards, values, mask, group ids) → advantages, returns
    6. optimise     per micro-batch: objective + KL loss (placement=loss) + entropy + value + extra losses
    7. log          one metrics dict after every plugin has acted (``rl.py``)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from instructrl.core.errors import RunFailure
from instructrl.core.ops import aggregate, global_mean, masked_mean, masked_var
from instructrl.core.types import (
    AdvantageInput,
    ExtraLossInput,
    KLInput,
    ObjectiveInput,
    PolicyOutput,
    Prompt,
    RewardInput,
    TokenBatch,
    TransformInput,
    last_token_index,
)
from instructrl.plugins.stages.common import Timer, and_finite, encode_prompts, finite_flags
from torch import Tensor

if TYPE_CHECKING:
    from .rl import RLComponents, Settings

RATIO_TOL = {"fp32": (1e-4, 1e-6), "bf16": (5e-2, 1e-3)}
"""Bounds on max|ratio − 1| and approx-KL on the first minibatch (bf16 rounds logits to ~3 digits)."""


def per_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """InstructGPT's per-token reward: ``−β·KL_t`` on every response token, plus the sequence
    score on the last real token (the EOS, or the last token of a truncated response); a row with
    no real token gets no score. Shapes: ``scores (B,)``, ``kl, mask (B, R)`` → ``(B, R)``."""
    rewards = -beta * kl * mask
    last = last_token_index(mask)
    rows = torch.nonzero(last >= 0).squeeze(-1)
    rewards[rows, last[rows]] += scores[rows]
    return rewards


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None) -> Tensor:
    """Per-token PPO value loss ``½·max((V − G)², (V_clip − G)²)`` (lm-human-preferences, PPO2),
    ``V_clip = V_old + clip(V − V_old, −c, c)``; without ``clip`` it is ``½(V − G)²``. ``(B, R)``."""
    loss = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    return 0.5 * loss


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 − Var[G − V] / Var[G]`` over masked tokens (global across processes)."""
    var_g = masked_var(returns, mask, global_=True).clamp_min(1e-8)
    return 1 - masked_var(returns - values, mask, global_=True) / var_g


@dataclass
class Experience:
    """One iteration's rollouts with everything step 6 needs. Shapes ``(B, R)`` unless noted."""

    batch: TokenBatch
    group_ids: Tensor  # (B,)
    old_logprobs: Tensor  # the sampler's when s.old_from_rollout (no separate forward)
    ref_logprobs: Tensor | None  # None without a KL term (no reference forward)
    ref_logits: Tensor | None  # (B, R, V) only for KL estimators that need logits
    values: Tensor | None
    advantages: Tensor
    returns: Tensor | None
    scores: Tensor  # (B,) shaped sequence scores
    kl: Tensor  # (B,) per-sequence KL used in the reward / logged
    metrics: dict[str, float]
    stats: dict[str, list[Tensor]] = field(default_factory=dict)  # step 6 accumulates here
    finite: dict[str, Tensor] = field(default_factory=dict)  # 0-dim bool per guarded quantity (rl.py reads)


def apply_transforms(c: RLComponents, inp: TransformInput, metrics: dict[str, float] | None) -> Tensor:
    """The reward transforms in order; ``reward/after/<name>`` into ``metrics`` after each."""
    scores = inp.scores
    for i, (name, transform) in enumerate(c.transforms):
        scores = transform(TransformInput(**{**vars(inp), "scores": scores})).float()
        if metrics is not None:
            key = f"reward/after/{name}"
            metrics[key if key not in metrics else f"reward/after/{i}_{name}"] = global_mean(scores)
    return scores


@torch.no_grad()
def experience(
    c: RLComponents, s: Settings, prompts: list[Prompt], iteration: int, rank: int, timer: Timer
) -> Experience:
    """Steps 1–5 of one RL iteration on this process's ``prompts``."""
    k, device = s.samples_per_prompt, next(c.policy.model.parameters()).device
    prompts = [p for p in prompts for _ in range(k)]
    group_ids = torch.arange(len(prompts), device=device) // k
    ids, mask = (t.to(device) for t in encode_prompts(c.policy.tokenizer, [p.text for p in prompts], s.max_prompt_tokens))  # fmt: skip
    torch.manual_seed(s.seed * 7_919 + iteration * 104_729 + rank)
    gen_kw = {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature}

    # 1. rollout: responses (+ logprobs at the sampling temperature, step 3)
    with timer("rollout"):
        gen = c.policy.generate(ids, mask, **gen_kw)
    batch, rmask = gen.batch, gen.batch.response_mask
    lengths = rmask.sum(-1).long()

    # 2. score: reward model at the last real token (and the greedy baseline's, for ReMax)
    with timer("score"):
        raw = c.reward.score(RewardInput(prompts=prompts, completions=gen.completions, batch=batch)).float()
        if s.greedy_baseline:
            greedy = c.policy.generate(ids, mask, **gen_kw, greedy=True)
            greedy_inp = RewardInput(prompts=prompts, completions=greedy.completions, batch=greedy.batch)
            greedy_raw = c.reward.score(greedy_inp).float()

    # 3. reference: old logprobs (on-policy: the sampler's), reference logprobs (if a KL term is active), values
    with timer("reference"):
        reuse = s.old_from_rollout and gen.logprobs is not None and gen.entropy is not None
        old = PolicyOutput(gen.logprobs, gen.entropy) if reuse else c.policy.forward(batch, temperature=s.temperature, return_logits=s.needs_logits)  # type: ignore[arg-type]  # fmt: skip
        ref = c.reference.forward(batch, temperature=s.temperature, return_logits=s.needs_logits) if s.kl_active else None  # fmt: skip
        values = c.value.values(batch).float() if c.value is not None else None

    # 4. shape: reward transforms on the sequence scores, then the per-token KL penalty
    m: dict[str, float] = {}
    shaping = TransformInput(
        scores=raw, prompts=prompts, completions=gen.completions, ended=gen.ended, lengths=lengths,
        group_ids=group_ids, max_new_tokens=s.max_new_tokens, iteration=iteration,
    )  # fmt: skip
    shaped = apply_transforms(c, shaping, m)
    baseline = None
    if s.greedy_baseline:
        base_inp = TransformInput(
            scores=greedy_raw, prompts=prompts, completions=greedy.completions, ended=greedy.ended,
            lengths=greedy.batch.response_mask.sum(-1).long(), group_ids=group_ids,
            max_new_tokens=s.max_new_tokens, iteration=iteration, is_baseline=True,
        )  # fmt: skip
        baseline = apply_transforms(c, base_inp, None)
    kl_inp = KLInput(logprobs=old.logprobs, ref_logprobs=ref.logprobs, mask=rmask, logits=old.logits, ref_logits=ref.logits) if ref is not None else None  # fmt: skip
    kl_tok = c.kl_estimator(kl_inp).float() * rmask if kl_inp else torch.zeros_like(rmask)  # kl/* read 0  # fmt: skip
    beta = float(c.kl_controller.coef)
    rewards = per_token_rewards(shaped, kl_tok, rmask, beta if s.kl_in_reward else 0.0)

    # 5. advantages
    adv = c.advantage(
        AdvantageInput(
            rewards=rewards, values=values, mask=rmask, group_ids=group_ids, baseline=baseline,
            scores=shaped, iteration=iteration,
        )
    )  # fmt: skip

    # statistics of this rollout (step 7 logs them with the training statistics)
    kl_seq = kl_tok.sum(-1)
    m.update({
            "reward/raw": global_mean(raw),
            "reward/shaped": global_mean(shaped),
            "reward/total": global_mean(rewards.sum(-1)),
            "kl/value": global_mean(kl_seq),
            "kl/per_token": float(masked_mean(kl_tok, rmask, global_=True)),
            "kl/coef": beta,
            "advantage/mean": float(masked_mean(adv.advantages, rmask, global_=True)),
            "advantage/std": float(masked_var(adv.advantages, rmask, global_=True).sqrt()),
            "response/length": global_mean(lengths.float()),
            "response/eos_rate": global_mean(gen.ended.float()),
            "policy/entropy_rollout": float(masked_mean(old.entropy, rmask, global_=True)),
            "forwards/skipped_old": float(reuse), "forwards/skipped_reference": float(ref is None),
    })  # fmt: skip
    if baseline is not None:
        m["reward/baseline"] = global_mean(baseline)
    if values is not None and adv.returns is not None:
        m["value/explained_variance"] = float(explained_variance(values, adv.returns, rmask))
        m["value/mean"] = float(masked_mean(values, rmask, global_=True))
        m["returns/mean"] = float(masked_mean(adv.returns, rmask, global_=True))
    return Experience(
        batch, group_ids, old.logprobs, ref and ref.logprobs, ref and ref.logits, values, adv.advantages, adv.returns,
        shaped, kl_seq, m, finite=finite_flags({"raw rewards": raw, "baseline rewards": baseline, "shaped rewards": shaped,
        "per-token rewards": rewards, "advantages": adv.advantages, "returns": adv.returns}),  # the guard's order
    )  # fmt: skip


@dataclass(frozen=True)
class MicroStep:
    """One forward/backward of step 6: its rows and its place in the minibatch."""

    rows: Tensor  # (b,) row indices into the Experience
    minibatch_rows: Tensor  # (M,) the rows of its whole minibatch
    index: int  # micro-batch index within the minibatch
    count: int  # micro-batches per minibatch
    first: bool  # the first micro-batch of the iteration (the ratio == 1 check)

    @property
    def last(self) -> bool:
        """The minibatch's last micro-batch: the optimiser steps after it."""
        return self.index == self.count - 1


def update_plan(n_episodes: int, s: Settings, iteration: int) -> list[MicroStep]:
    """The order of step 6: for each epoch a seeded permutation, cut into minibatches, each cut (in
    row order) into micro-batches of ``micro_batch_size`` rows."""
    gen = torch.Generator().manual_seed(s.seed * 31 + iteration)
    size = n_episodes // s.minibatches
    micro = s.micro_batch_size or size
    plan = []
    for _ in range(s.epochs):
        order = torch.randperm(n_episodes, generator=gen)
        for mb in order.split(size):
            mb = mb.sort().values  # a prompt's samples in one micro-batch: they share its forward (hf policy)
            for i, rows in enumerate(mb.split(micro)):
                plan.append(MicroStep(rows, mb, i, size // micro, not plan))
    return plan


def check_ratio(
    logprobs: Tensor, old: Tensor, mask: Tensor, precision: str, iteration: int, enforce: bool = True
) -> dict[str, float]:
    """Before any update of an iteration the policy *is* the rollout policy: ratio == 1 (a
    :class:`RunFailure` beyond the precision's bounds when ``enforce``); returns both deviations."""
    log_ratio = (logprobs.detach() - old) * mask
    ratio_dev = float((log_ratio.exp() - 1).abs().max())
    approx_kl = float(masked_mean((log_ratio.exp() - 1) - log_ratio, mask))
    tol_r, tol_k = RATIO_TOL[precision]
    if enforce and (ratio_dev > tol_r or approx_kl > tol_k):
        raise RunFailure(
            f"rl: ratio invariant violated on the first minibatch of iteration {iteration}: "
            f"max|ratio-1|={ratio_dev:.2e} (bound {tol_r:.0e}), approx-KL={approx_kl:.2e} (bound {tol_k:.0e}); "
            "rollout and training disagree (padding, position ids, temperature or dropout)"
        )
    return {"invariant/ratio_dev": ratio_dev, "invariant/approx_kl": approx_kl}


def micro_batch_loss(
    c: RLComponents, s: Settings, exp: Experience, step: MicroStep, iteration: int, opt_step: int, precision: str
) -> Tensor:  # fmt: skip
    """Step 6 on one micro-batch: the loss to backpropagate. Every term is normalised by the
    *minibatch* totals, so the micro-batch losses of one minibatch sum to the minibatch loss."""
    rows, batch = step.rows, exp.batch.select(step.rows)
    mask = batch.response_mask
    mb_tokens = exp.batch.response_mask[step.minibatch_rows].sum().clamp_min(1.0)
    norm = {"num_seqs": len(step.minibatch_rows), "num_tokens": mb_tokens, "norm_len": s.max_new_tokens}
    share = len(rows) / len(step.minibatch_rows)

    def record(key: str, value: Tensor | float) -> None:  # averaged over micro-batches and processes
        exp.stats.setdefault(key, []).append(torch.as_tensor(value, dtype=torch.float).detach().reshape(()))

    kl_loss = not s.kl_in_reward
    out = c.policy.forward(batch, temperature=s.temperature, return_logits=kl_loss and s.needs_logits)
    old = exp.old_logprobs[rows]
    if step.first:
        exp.metrics.update(check_ratio(out.logprobs, old, mask, precision, iteration, s.check_ratio))
    obj = c.objective(
        ObjectiveInput(
            logprobs=out.logprobs, old_logprobs=old, advantages=exp.advantages[rows], mask=mask,
            entropy=out.entropy, ref_logprobs=None if exp.ref_logprobs is None else exp.ref_logprobs[rows], group_ids=exp.group_ids[rows],
            values=exp.values[rows] if exp.values is not None else None,
            returns=exp.returns[rows] if exp.returns is not None else None,
            iteration=iteration, progress=iteration / s.iterations,
        )
    )  # fmt: skip
    per_token = obj.loss
    if kl_loss and exp.ref_logprobs is not None:  # a KL term is active
        ref_logits = exp.ref_logits[rows] if exp.ref_logits is not None else None
        kl_inp = KLInput(logprobs=out.logprobs, ref_logprobs=exp.ref_logprobs[rows], mask=mask, logits=out.logits, ref_logits=ref_logits)  # fmt: skip
        kl = c.kl_estimator(kl_inp)
        per_token = per_token + float(c.kl_controller.coef) * kl
        record("kl/loss_term", masked_mean(kl.detach(), mask))
    if s.entropy_coef:
        per_token = per_token - s.entropy_coef * out.entropy
    loss = aggregate(per_token, mask, c.objective.aggregation, **norm)
    record("policy/loss", loss.detach() / share)
    for name, v in obj.metrics.items():
        record(f"policy/{name}", v)
    record("policy/entropy", masked_mean(out.entropy.detach(), mask))
    if c.value is not None and exp.returns is not None and exp.values is not None:
        v = c.value.values(batch).float()
        vloss = aggregate(clipped_value_loss(v, exp.values[rows], exp.returns[rows], s.value_clip), mask, "token_mean", num_tokens=mb_tokens)  # fmt: skip
        loss = loss + s.value_coef * vloss
        record("value/loss", vloss.detach() / share)
        if s.value_clip is not None:
            record("value/clip_frac", masked_mean(((v - exp.values[rows]).abs() > s.value_clip).float(), mask))  # fmt: skip
    for name, extra in c.extra_losses:
        e = extra(
            ExtraLossInput(
                batch=batch, output=out, policy=c.policy, reference=c.reference, task=c.task, step=opt_step,
                iteration=iteration, micro_index=step.index, micro_count=step.count, share=share,
                minibatch_tokens=int(mb_tokens),
            )
        )  # fmt: skip
        loss = loss + e.loss
        for key, v in e.metrics.items():
            record(f"{name}/{key}", v)
    return and_finite(exp.finite, "loss", loss)  # the guard checks it before the optimiser step
