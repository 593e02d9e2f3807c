"""Small typed containers that travel between components.

Shape conventions used throughout the project (torchtune-style):

- ``B``: sequences in a batch (prompts × samples per prompt)
- ``P``: prompt length after **left** padding
- ``R``: response length after **right** padding
- ``V``: vocabulary size

A full sequence is ``[left-padded prompt | right-padded response]`` of length ``P + R``; the logits
that predict response token ``t`` sit at position ``P + t - 1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------
# Task data (strings)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One instruction prompt.

    ``fields`` carries the dataset row's other fields (for the simulated world: the task kind and
    the correct answer); callable reward functions receive them.
    """

    id: str
    text: str
    fields: Mapping[str, Any] = field(default_factory=dict)


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


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """``(B, T)`` position ids that count only real tokens; padding gets 0.

    This is what HF ``generate`` uses for left-padded batches, so training and rollout see the same
    positions (the ratio == 1 invariant depends on it).
    """
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_min(0) * attention_mask.long()


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
# Algorithm inputs / outputs
# --------------------------------------------------------------------------------------------


class KLInput(NamedTuple):
    """Inputs of a KL estimator. ``Δ = logprobs − ref_logprobs``.

    Attributes:
        logprobs: ``(B, R)`` log π of the sampled tokens.
        ref_logprobs: ``(B, R)`` log π_ref of the same tokens.
        logits: ``(B, R, V)`` tempered policy logits (only for estimators with ``needs_logits``).
        ref_logits: ``(B, R, V)`` tempered reference logits (idem).
    """

    logprobs: Tensor
    ref_logprobs: Tensor
    logits: Tensor | None = None
    ref_logits: Tensor | None = None


class AdvantageInput(NamedTuple):
    """The one input every advantage estimator takes.

    Attributes:
        rewards: ``(B, R)`` per-token rewards (the sequence score sits on the last real token; a KL
            penalty, if placed in the reward, on every token). Zero on padding.
        values: ``(B, R)`` value estimates, or ``None`` for critic-free estimators.
        mask: ``(B, R)`` float response mask.
        group_ids: ``(B,)`` long; samples of the same prompt share an id.
        baseline: ``(B,)`` optional per-sequence baseline (ReMax: the greedy response's reward).
    """

    rewards: Tensor
    values: Tensor | None
    mask: Tensor
    group_ids: Tensor
    baseline: Tensor | None = None


class AdvantageOutput(NamedTuple):
    """Advantages ``(B, R)`` and value targets ``(B, R)`` (``None`` without a critic)."""

    advantages: Tensor
    returns: Tensor | None


class ObjectiveInput(NamedTuple):
    """Inputs of a policy objective.

    Attributes:
        logprobs: ``(B, R)`` current log π (requires grad).
        old_logprobs: ``(B, R)`` log π at rollout time.
        advantages: ``(B, R)``.
        mask: ``(B, R)`` float response mask.
    """

    logprobs: Tensor
    old_logprobs: Tensor
    advantages: Tensor
    mask: Tensor


class LossOutput(NamedTuple):
    """A loss and the metrics that describe it.

    For an Objective, ``loss`` is per-token ``(B, R)`` and is aggregated by the caller with the
    objective's aggregation mode; for an ExtraLoss it is a scalar already multiplied by its
    coefficient. ``metrics`` values are scalar tensors (detached).
    """

    loss: Tensor
    metrics: dict[str, Tensor]


class RewardInput(NamedTuple):
    """What a reward model scores.

    Attributes:
        prompts: the ``B`` prompts (one per row; repeated for several samples of a prompt).
        completions: the ``B`` decoded responses.
        batch: the same rows as tokens (for models that read tokens).
    """

    prompts: list[Prompt]
    completions: list[Completion]
    batch: TokenBatch


class ShapingInput(NamedTuple):
    """Per-sequence context a reward transform may use.

    Attributes:
        scores: ``(B,)`` the current sequence scores (output of the previous transform).
        ended: ``(B,)`` bool, the response ended with EOS.
        lengths: ``(B,)`` long, response lengths in tokens (EOS included).
        max_new_tokens: the rollout's token budget.
    """

    scores: Tensor
    ended: Tensor
    lengths: Tensor
    max_new_tokens: int


def empty_metrics() -> dict[str, Tensor]:
    """An empty metrics dict (typed helper)."""
    return {}


def scalar(x: float | Tensor) -> Tensor:
    """A detached float32 scalar tensor for a metrics dict."""
    if isinstance(x, Tensor):
        return x.detach().float().reshape(())
    return torch.tensor(float(x))
