"""The typed containers that travel between the RL step and the components.

Every kind is called with **one** input container: a frozen, keyword-only dataclass carrying
everything the RL step has at that point. Fields are only ever *added* (with a default), so a plugin
written against fewer fields keeps working. Shapes: ``B`` sequences (prompts × samples), ``P``
prompt length (**left**-padded), ``R`` response length (**right**-padded), ``V`` vocabulary; a
sequence is ``[prompt | response]`` and the logits predicting response token ``t`` sit at ``P + t − 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .protocols import Policy, Task

API_VERSION = 1
"""The plugin API version, bumped when a plugin-facing signature changes incompatibly."""

# Task data (strings)
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
        r, k = self.ranks, len(self.ranks)
        return [(i, j) if r[i] < r[j] else (j, i) for i in range(k) for j in range(i + 1, k) if r[i] != r[j]]


class TokenBatch(NamedTuple):
    """Prompt + response tokens, prompts left-padded to ``P`` and responses right-padded to ``R``."""

    input_ids: Tensor  # ``(B, P + R)`` token ids (padding = the tokenizer's pad id).
    attention_mask: Tensor  # ``(B, P + R)`` 1 on real tokens, 0 on padding.
    # ``(B, P + R)`` ``cumsum(attention_mask) - 1``, so the first real token of every row is position 0
    # whatever its padding; padding positions hold 0.
    position_ids: Tensor
    response_mask: Tensor  # ``(B, R)`` float, 1 on real response tokens (including the EOS token).
    prompt_len: int  # ``P``.

    @property
    def response_ids(self) -> Tensor:
        """``(B, R)`` the response tokens."""
        return self.input_ids[:, self.prompt_len :]

    def select(self, index: Tensor) -> TokenBatch:
        """Rows ``index`` of the batch (for minibatches)."""
        return TokenBatch(*(t[index] for t in self[:4]), self.prompt_len)

    def to(self, device: torch.device | str) -> TokenBatch:
        """The batch on ``device``."""
        return TokenBatch(*(t.to(device) for t in self[:4]), self.prompt_len)


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
    """What ``Policy.generate`` returns."""

    batch: TokenBatch  # the prompt + sampled response tokens.
    ended: Tensor  # ``(B,)`` bool, the response ended with EOS within ``max_new_tokens``.
    completions: list[Completion]  # the decoded responses (EOS stripped), one per row.
    # ``(B, R)`` fp32 ``log softmax(logits / T)`` of the drawn tokens from the sampling pass itself, 0 on
    # padding; ``None`` when the sampler does not provide them.
    logprobs: Tensor | None = None
    entropy: Tensor | None = None  # ``(B, R)`` entropy of ``softmax(logits / T)`` at each step (idem).


class PolicyOutput(NamedTuple):
    """Per-token statistics of given responses under a policy at a temperature."""

    logprobs: Tensor  # ``(B, R)`` ``log π(y_t | x, y_<t)`` of ``softmax(logits / T)``; 0 on padding.
    entropy: Tensor  # ``(B, R)`` entropy of ``softmax(logits / T)``; 0 on padding.
    # ``(B, R, V)`` the tempered logits, only when asked for (the ``full`` KL needs them).
    logits: Tensor | None = None


@dataclass(frozen=True, kw_only=True)
class Needs:
    """What a component needs from the stage, declared when it registers
    (``register(name, factory, needs=Needs(values=True))``) and read without building it."""

    values: bool = False  # an advantage estimator needs a value model (``gae``); critic-free ones build none.
    logits: bool = False  # a KL estimator needs both models' full-vocabulary logits (``full``).
    # an advantage estimator needs the reward of the greedy response to each prompt in
    # ``AdvantageInput.baseline`` (ReMax).
    greedy_baseline: bool = False
    min_samples_per_prompt: int = 1  # smallest valid ``rollout.samples_per_prompt``.
    default_samples_per_prompt: int = 1  # ``rollout.samples_per_prompt`` when the recipe leaves it null.
    # the component implements :class:`~instructrl.core.protocols.Stateful`; its state is saved in checkpoints
    # and restored on resume.
    stateful: bool = False
    # a logger that every stage gets whatever the ``loggers`` list says (``csv``: ``metrics.csv`` is what
    # reports and sweeps read).
    always_on: bool = False
    # a KL controller: whether, with this config, it can ever apply a penalty (``fixed``: ``coef != 0``);
    # ``None``: always. Without a penalty the RL step runs no reference forward.
    active: Callable[[object], bool] | None = None
    # ``check(config, recipe, stages)``: what depends on the rest of the recipe (``stages``: those that
    # run or come from the cache), run at validation; raises ``ValueError("field: ...")``.
    check: Callable[[object, object, Sequence[str]], None] | None = None

    def __post_init__(self) -> None:
        if self.min_samples_per_prompt < 1 or self.default_samples_per_prompt < self.min_samples_per_prompt:
            raise ValueError(
                "Needs: need 1 <= min_samples_per_prompt <= default_samples_per_prompt "
                f"(got {self.min_samples_per_prompt}, {self.default_samples_per_prompt})"
            )


@dataclass(frozen=True, kw_only=True)
class KLInput:
    """Inputs of a KL estimator. ``Δ = logprobs − ref_logprobs``."""

    logprobs: Tensor  # ``(B, R)`` log π of the sampled tokens.
    ref_logprobs: Tensor  # ``(B, R)`` log π_ref of the same tokens.
    mask: Tensor | None = None  # ``(B, R)`` float response mask (the caller multiplies the estimate by it).
    # ``(B, R, V)`` tempered policy logits (only for estimators declaring ``logits``).
    logits: Tensor | None = None
    ref_logits: Tensor | None = None  # ``(B, R, V)`` tempered reference logits (idem).


@dataclass(frozen=True, kw_only=True)
class TransformInput:
    """What a reward transform sees: the sequence scores and everything known about the rollout."""

    scores: Tensor  # ``(B,)`` the current sequence scores (output of the previous transform).
    prompts: Sequence[Prompt]  # the ``B`` prompts (repeated for several samples of a prompt).
    completions: Sequence[Completion]  # the ``B`` decoded responses.
    ended: Tensor  # ``(B,)`` bool, the response ended with EOS.
    lengths: Tensor  # ``(B,)`` long, response lengths in tokens (EOS included).
    group_ids: Tensor  # ``(B,)`` long; samples of the same prompt share an id.
    max_new_tokens: int  # the rollout's token budget.
    iteration: int = 0  # the RL iteration (0-based).
    # the batch is a baseline (ReMax's greedy responses), not the rollout: a stateful transform must not
    # update its statistics on it.
    is_baseline: bool = False


@dataclass(frozen=True, kw_only=True)
class AdvantageInput:
    """The one input every advantage estimator takes."""

    # ``(B, R)`` per-token rewards (the sequence score sits on the last real token; a KL penalty, if placed in
    # the reward, on every token). Zero on padding.
    rewards: Tensor
    values: Tensor | None  # ``(B, R)`` value estimates, or ``None`` for critic-free estimators.
    mask: Tensor  # ``(B, R)`` float response mask.
    group_ids: Tensor  # ``(B,)`` long; samples of the same prompt share an id.
    # ``(B,)`` per-sequence baseline (ReMax: the greedy response's shaped reward), or ``None`` unless the
    # estimator declares ``greedy_baseline``.
    baseline: Tensor | None = None
    scores: Tensor | None = None  # ``(B,)`` the shaped sequence scores (without the KL penalty).
    iteration: int = 0  # the RL iteration (0-based).


class AdvantageOutput(NamedTuple):
    """Advantages ``(B, R)`` and value targets ``(B, R)`` (``None`` without a critic)."""

    advantages: Tensor
    returns: Tensor | None


@dataclass(frozen=True, kw_only=True)
class ObjectiveInput:
    """Inputs of a policy objective, for one micro-batch."""

    logprobs: Tensor  # ``(B, R)`` current log π (requires grad).
    old_logprobs: Tensor  # ``(B, R)`` log π at rollout time.
    advantages: Tensor  # ``(B, R)``.
    mask: Tensor  # ``(B, R)`` float response mask.
    entropy: Tensor | None = None  # ``(B, R)`` current entropy (requires grad).
    # ``(B, R)`` log π_ref, or ``None`` when the run has no reference forward.
    ref_logprobs: Tensor | None = None
    group_ids: Tensor | None = None  # ``(B,)`` long; samples of the same prompt share an id.
    values: Tensor | None = None  # ``(B, R)`` rollout-time values, or ``None`` without a critic.
    returns: Tensor | None = None  # ``(B, R)`` value targets, or ``None`` without a critic.
    iteration: int = 0  # the RL iteration (0-based).
    progress: float = 0.0  # ``iteration / iterations``, in [0, 1).


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
    """What a KL controller observes after each iteration."""

    kl: Tensor  # ``(B,)`` per-sequence KL (nats, summed over tokens) of this process's rollouts.
    mean_kl: float  # the mean per-sequence KL over all processes (what ``kl/value`` logs).
    scores: Tensor  # ``(B,)`` shaped sequence scores (without the KL penalty).
    n_episodes: int  # episodes of the iteration over all processes.
    iteration: int  # the RL iteration (0-based).
    iterations: int  # the run's total iterations.


@dataclass(frozen=True, kw_only=True)
class ExtraLossInput:
    """What an extra loss sees, once per micro-batch of every optimiser step.

    The loss it returns must already be multiplied by ``share`` (or computed on its ``micro_index``
    part of a per-step batch) so that the micro-batch losses of one minibatch sum to the
    whole-minibatch loss: the gradient is then exact under gradient accumulation."""

    batch: TokenBatch  # the micro-batch of rollout sequences (a TokenBatch).
    output: PolicyOutput  # the policy's output on ``batch`` (logprobs / entropy with grad).
    policy: Policy  # the policy being trained (call ``policy.lm_loss`` etc. for other text).
    reference: Policy | None  # the frozen reference policy, or ``None`` when the run has none.
    task: Task  # the Task (pretraining text, demonstrations, prompts).
    step: int  # the optimiser step (0-based, global over the run).
    iteration: int = 0  # the RL iteration (0-based).
    micro_index: int = 0  # this micro-batch's index in its minibatch.
    micro_count: int = 1  # micro-batches in the minibatch.
    share: float = 1.0  # this micro-batch's fraction of the minibatch's sequences (the shares sum to 1).
    minibatch_tokens: int = 0  # real response tokens in the whole minibatch (for exact token means).


@dataclass(frozen=True, kw_only=True)
class RewardInput:
    """What a reward model scores."""

    prompts: Sequence[Prompt]  # the ``B`` prompts (one per row; repeated for several samples of a prompt).
    completions: Sequence[Completion]  # the ``B`` decoded responses.
    batch: TokenBatch  # the same rows as tokens (for models that read tokens).


def scalar(x: float | Tensor) -> Tensor:
    """A detached float32 scalar tensor for a metrics dict."""
    if isinstance(x, Tensor):
        return x.detach().float().reshape(())
    return torch.tensor(float(x))
