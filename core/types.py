"""The typed containers that travel between the RL step and the components.

Every component kind is called with **one** input container: a frozen, keyword-only dataclass that
carries everything the RL step has at that point. New fields are only ever *added* (with a
default), so a plugin written against an older field set keeps working; plugins read the fields
they need and ignore the rest.

Shape conventions (torchtune-style):

- ``B``: sequences in a batch (prompts × samples per prompt)
- ``P``: prompt length after **left** padding
- ``R``: response length after **right** padding
- ``V``: vocabulary size

A full sequence is ``[left-padded prompt | right-padded response]`` of length ``P + R``; the logits
that predict response token ``t`` sit at position ``P + t - 1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .protocols import Policy, Task

API_VERSION = 1
"""The plugin API version. Bumped when a plugin-facing signature changes incompatibly; a plugin
can check ``instructrl.core.plugin_api.API_VERSION`` at import time."""

# --------------------------------------------------------------------------------------------
# Task data (strings)
# --------------------------------------------------------------------------------------------

FieldValue = str | int | float | bool | None


@dataclass(frozen=True)
class Prompt:
    """One instruction prompt.

    ``fields`` carries the dataset row's other fields (for the simulated world: the task kind and
    the correct answer); callable reward functions receive them.
    """

    id: str
    text: str
    fields: Mapping[str, FieldValue] = field(default_factory=dict)


class Completion(NamedTuple):
    """A response string and whether it ended with the end-of-response token (not truncated)."""

    text: str
    ended: bool = True


@dataclass(frozen=True)
class Demonstration:
    """A labeler-written response to a prompt (SFT data)."""

    prompt: Prompt
    response: str


@dataclass(frozen=True)
class Ranking:
    """``K`` responses to one prompt and the labeler's ranks (0 = best; equal ranks are a tie)."""

    prompt: Prompt
    responses: tuple[Completion, ...]
    ranks: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.responses) != len(self.ranks):
            raise ValueError(
                f"ranking of prompt {self.prompt.id!r}: {len(self.responses)} responses but {len(self.ranks)} ranks"
            )

    def pairs(self) -> list[tuple[int, int]]:
        """Every non-tied ``(winner, loser)`` index pair; ``C(K, 2)`` pairs when nothing ties."""
        k = len(self.ranks)
        out = []
        for i in range(k):
            for j in range(i + 1, k):
                if self.ranks[i] < self.ranks[j]:
                    out.append((i, j))
                elif self.ranks[j] < self.ranks[i]:
                    out.append((j, i))
        return out


# --------------------------------------------------------------------------------------------
# Token batches
# --------------------------------------------------------------------------------------------


class TokenBatch(NamedTuple):
    """Prompt + response tokens, prompts left-padded to ``P`` and responses right-padded to ``R``.

    Attributes:
        input_ids: ``(B, P + R)`` token ids (padding = the tokenizer's pad id).
        attention_mask: ``(B, P + R)`` 1 on real tokens, 0 on padding.
        position_ids: ``(B, P + R)`` ``cumsum(attention_mask) - 1``, so the first real token of
            every row is position 0 whatever its padding; padding positions hold 0.
        response_mask: ``(B, R)`` float, 1 on real response tokens (including the EOS token).
        prompt_len: ``P``.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    response_mask: Tensor
    prompt_len: int

    @property
    def response_ids(self) -> Tensor:
        """``(B, R)`` the response tokens."""
        return self.input_ids[:, self.prompt_len :]

    def select(self, index: Tensor) -> TokenBatch:
        """Rows ``index`` of the batch (for minibatches)."""
        return TokenBatch(
            self.input_ids[index],
            self.attention_mask[index],
            self.position_ids[index],
            self.response_mask[index],
            self.prompt_len,
        )

    def to(self, device: torch.device | str) -> TokenBatch:
        """The batch on ``device``."""
        return TokenBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.response_mask.to(device),
            self.prompt_len,
        )


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """``(B, T)`` position ids that count only real tokens; padding gets 0.

    This is what HF ``generate`` uses for left-padded batches, so training and rollout see the same
    positions (the ratio == 1 invariant depends on it).
    """
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_min(0) * attention_mask.long()


def join_prompt_response(
    prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor
) -> TokenBatch:
    """Left-padded prompts ``(B, P)`` + right-padded responses ``(B, R)`` → one TokenBatch."""
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask.long(), response_mask.long()], dim=1)
    return TokenBatch(
        input_ids,
        attention_mask,
        position_ids_from_mask(attention_mask),
        response_mask.float(),
        prompt_ids.shape[1],
    )


def last_token_index(mask: Tensor) -> Tensor:
    """``(B,)`` index of the last 1 in each row of a right-padded ``(B, R)`` mask; ``-1`` for a row
    with no real token (callers must not write there)."""
    return mask.long().sum(-1) - 1


class Generation(NamedTuple):
    """What ``Policy.generate`` returns.

    Attributes:
        batch: the prompt + sampled response tokens.
        ended: ``(B,)`` bool, the response ended with EOS within ``max_new_tokens``.
        completions: the decoded responses (EOS stripped), one per row.
    """

    batch: TokenBatch
    ended: Tensor
    completions: list[Completion]


class PolicyOutput(NamedTuple):
    """Per-token statistics of given responses under a policy at a temperature.

    Attributes:
        logprobs: ``(B, R)`` ``log π(y_t | x, y_<t)`` of ``softmax(logits / T)``; 0 on padding.
        entropy: ``(B, R)`` entropy of ``softmax(logits / T)``; 0 on padding.
        logits: ``(B, R, V)`` the tempered logits, only when asked for (the ``full`` KL needs them).
    """

    logprobs: Tensor
    entropy: Tensor
    logits: Tensor | None = None


# --------------------------------------------------------------------------------------------
# Capabilities, declared at registration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Needs:
    """What a component needs from the stage, declared when it registers
    (``register(name, factory, needs=Needs(values=True))``) and read without building it.

    Attributes:
        values: an advantage estimator needs a value model (``gae``); critic-free ones build none.
        logits: a KL estimator needs both models' full-vocabulary logits (``full``).
        greedy_baseline: an advantage estimator needs the reward of the greedy response to each
            prompt in ``AdvantageInput.baseline`` (ReMax).
        min_samples_per_prompt: smallest valid ``rollout.samples_per_prompt``.
        default_samples_per_prompt: ``rollout.samples_per_prompt`` when the recipe leaves it null.
        stateful: the component implements :class:`~instructrl.core.protocols.Stateful`; its state
            is saved in checkpoints and restored on resume.
        always_on: a logger that every stage gets whatever the ``loggers`` list says (``csv``:
            ``metrics.csv`` is what reports and sweeps read).
    """

    values: bool = False
    logits: bool = False
    greedy_baseline: bool = False
    min_samples_per_prompt: int = 1
    default_samples_per_prompt: int = 1
    stateful: bool = False
    always_on: bool = False

    def __post_init__(self) -> None:
        if self.min_samples_per_prompt < 1 or self.default_samples_per_prompt < self.min_samples_per_prompt:
            raise ValueError(
                "Needs: need 1 <= min_samples_per_prompt <= default_samples_per_prompt "
                f"(got {self.min_samples_per_prompt}, {self.default_samples_per_prompt})"
            )


# --------------------------------------------------------------------------------------------
# One input per kind
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class KLInput:
    """Inputs of a KL estimator. ``Δ = logprobs − ref_logprobs``.

    Attributes:
        logprobs: ``(B, R)`` log π of the sampled tokens.
        ref_logprobs: ``(B, R)`` log π_ref of the same tokens.
        mask: ``(B, R)`` float response mask (the caller multiplies the estimate by it).
        logits: ``(B, R, V)`` tempered policy logits (only for estimators declaring ``logits``).
        ref_logits: ``(B, R, V)`` tempered reference logits (idem).
    """

    logprobs: Tensor
    ref_logprobs: Tensor
    mask: Tensor | None = None
    logits: Tensor | None = None
    ref_logits: Tensor | None = None


@dataclass(frozen=True, kw_only=True)
class TransformInput:
    """What a reward transform sees: the sequence scores and everything known about the rollout.

    Attributes:
        scores: ``(B,)`` the current sequence scores (output of the previous transform).
        prompts: the ``B`` prompts (repeated for several samples of a prompt).
        completions: the ``B`` decoded responses.
        ended: ``(B,)`` bool, the response ended with EOS.
        lengths: ``(B,)`` long, response lengths in tokens (EOS included).
        group_ids: ``(B,)`` long; samples of the same prompt share an id.
        max_new_tokens: the rollout's token budget.
        iteration: the RL iteration (0-based).
        is_baseline: the batch is a baseline (ReMax's greedy responses), not the rollout: a
            stateful transform must not update its statistics on it.
    """

    scores: Tensor
    prompts: Sequence[Prompt]
    completions: Sequence[Completion]
    ended: Tensor
    lengths: Tensor
    group_ids: Tensor
    max_new_tokens: int
    iteration: int = 0
    is_baseline: bool = False


@dataclass(frozen=True, kw_only=True)
class AdvantageInput:
    """The one input every advantage estimator takes.

    Attributes:
        rewards: ``(B, R)`` per-token rewards (the sequence score sits on the last real token; a KL
            penalty, if placed in the reward, on every token). Zero on padding.
        values: ``(B, R)`` value estimates, or ``None`` for critic-free estimators.
        mask: ``(B, R)`` float response mask.
        group_ids: ``(B,)`` long; samples of the same prompt share an id.
        baseline: ``(B,)`` per-sequence baseline (ReMax: the greedy response's shaped reward), or
            ``None`` unless the estimator declares ``greedy_baseline``.
        scores: ``(B,)`` the shaped sequence scores (without the KL penalty).
        iteration: the RL iteration (0-based).
    """

    rewards: Tensor
    values: Tensor | None
    mask: Tensor
    group_ids: Tensor
    baseline: Tensor | None = None
    scores: Tensor | None = None
    iteration: int = 0


class AdvantageOutput(NamedTuple):
    """Advantages ``(B, R)`` and value targets ``(B, R)`` (``None`` without a critic)."""

    advantages: Tensor
    returns: Tensor | None


@dataclass(frozen=True, kw_only=True)
class ObjectiveInput:
    """Inputs of a policy objective, for one micro-batch.

    Attributes:
        logprobs: ``(B, R)`` current log π (requires grad).
        old_logprobs: ``(B, R)`` log π at rollout time.
        advantages: ``(B, R)``.
        mask: ``(B, R)`` float response mask.
        entropy: ``(B, R)`` current entropy (requires grad).
        ref_logprobs: ``(B, R)`` log π_ref, or ``None`` when the run has no reference forward.
        group_ids: ``(B,)`` long; samples of the same prompt share an id.
        values: ``(B, R)`` rollout-time values, or ``None`` without a critic.
        returns: ``(B, R)`` value targets, or ``None`` without a critic.
        iteration: the RL iteration (0-based); ``progress``: ``iteration / iterations`` in [0, 1).
    """

    logprobs: Tensor
    old_logprobs: Tensor
    advantages: Tensor
    mask: Tensor
    entropy: Tensor | None = None
    ref_logprobs: Tensor | None = None
    group_ids: Tensor | None = None
    values: Tensor | None = None
    returns: Tensor | None = None
    iteration: int = 0
    progress: float = 0.0


class LossOutput(NamedTuple):
    """A loss and the metrics that describe it.

    For an Objective, ``loss`` is per-token ``(B, R)`` and is aggregated by the caller with the
    objective's aggregation mode; for an ExtraLoss it is a scalar already multiplied by its
    coefficient and by the micro-batch's share. ``metrics`` values are scalar tensors (detached).
    """

    loss: Tensor
    metrics: dict[str, Tensor]


@dataclass(frozen=True, kw_only=True)
class ControllerInput:
    """What a KL controller observes after each iteration.

    Attributes:
        kl: ``(B,)`` per-sequence KL (nats, summed over tokens) of this process's rollouts.
        mean_kl: the mean per-sequence KL over all processes (what ``kl/value`` logs).
        scores: ``(B,)`` shaped sequence scores (without the KL penalty).
        n_episodes: episodes of the iteration over all processes.
        iteration: the RL iteration (0-based); ``iterations``: the run's total.
    """

    kl: Tensor
    mean_kl: float
    scores: Tensor
    n_episodes: int
    iteration: int
    iterations: int


@dataclass(frozen=True, kw_only=True)
class ExtraLossInput:
    """What an extra loss sees, once per micro-batch of every optimiser step.

    The loss it returns must already be multiplied by ``share`` (or computed on its ``micro_index``
    part of a per-step batch) so that the micro-batch losses of one minibatch sum to the
    whole-minibatch loss: the gradient is then exact under gradient accumulation.

    Attributes:
        batch: the micro-batch of rollout sequences (a TokenBatch).
        output: the policy's output on ``batch`` (logprobs / entropy with grad).
        policy: the policy being trained (call ``policy.lm_loss`` etc. for other text).
        reference: the frozen reference policy, or ``None`` when the run has none.
        task: the Task (pretraining text, demonstrations, prompts).
        step: the optimiser step (0-based, global over the run).
        iteration: the RL iteration (0-based).
        micro_index / micro_count: this micro-batch's index in its minibatch, and how many there are.
        share: this micro-batch's fraction of the minibatch's sequences (the shares sum to 1).
        minibatch_tokens: real response tokens in the whole minibatch (for exact token means).
    """

    batch: TokenBatch
    output: PolicyOutput
    policy: Policy
    reference: Policy | None
    task: Task
    step: int
    iteration: int = 0
    micro_index: int = 0
    micro_count: int = 1
    share: float = 1.0
    minibatch_tokens: int = 0


@dataclass(frozen=True, kw_only=True)
class RewardInput:
    """What a reward model scores.

    Attributes:
        prompts: the ``B`` prompts (one per row; repeated for several samples of a prompt).
        completions: the ``B`` decoded responses.
        batch: the same rows as tokens (for models that read tokens).
    """

    prompts: Sequence[Prompt]
    completions: Sequence[Completion]
    batch: TokenBatch


def scalar(x: float | Tensor) -> Tensor:
    """A detached float32 scalar tensor for a metrics dict."""
    if isinstance(x, Tensor):
        return x.detach().float().reshape(())
    return torch.tensor(float(x))
