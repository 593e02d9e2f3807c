"""The component interfaces. Each is a small :class:`typing.Protocol`: implement the methods, no
base class needed. Shapes follow :mod:`instructrl.core.types`.

A component is built by the factory its plugin registers, called as ``factory(config, ctx)`` with
its validated config dataclass and a :class:`~instructrl.core.registry.BuildContext`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .types import (
    AdvantageInput,
    AdvantageOutput,
    Completion,
    Demonstration,
    Generation,
    KLInput,
    LossOutput,
    ObjectiveInput,
    PolicyOutput,
    Prompt,
    Ranking,
    RewardInput,
    ShapingInput,
    TokenBatch,
)

SampleFn = Callable[[Sequence[Prompt], int], list[list[Completion]]]
"""``sample(prompts, k)`` → for each prompt, ``k`` completions sampled from the current policy."""


@runtime_checkable
class Policy(Protocol):
    """A causal language model that samples responses and scores given ones."""

    model: torch.nn.Module
    """The trainable module (optimised, checkpointed and saved)."""
    tokenizer: Any
    """The HF tokenizer: ``pad_token_id`` and ``eos_token_id`` are set and distinct."""

    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        *,
        max_new_tokens: int,
        temperature: float,
        greedy: bool = False,
    ) -> Generation:
        """Sample responses to left-padded prompts ``(B, P)``.

        Sampling is from ``softmax(logits / temperature)`` over the full vocabulary (no top-k/top-p).
        Tokens after EOS are padding. Returns a :class:`Generation` whose batch is ``(B, P + R)``.
        """
        ...

    def forward(self, batch: TokenBatch, *, temperature: float, return_logits: bool = False) -> PolicyOutput:
        """Per-token logprobs ``(B, R)`` and entropy ``(B, R)`` of the batch's responses under
        ``softmax(logits / temperature)``, with the batch's position ids; grads flow when enabled."""
        ...

    def lm_loss(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Mean next-token cross-entropy (nats per token, temperature 1) over the real tokens of
        ``(B, T)`` text; a scalar."""
        ...

    def reference(self) -> Policy:
        """A frozen policy to measure KL against (InstructGPT: the SFT model the policy starts from)."""
        ...

    def save(self, path: str) -> None:
        """Write an HF model directory (model + tokenizer) loadable by ``AutoModelForCausalLM``."""
        ...


@runtime_checkable
class ValueModel(Protocol):
    """Per-token state values for the critic."""

    model: torch.nn.Module

    def values(self, batch: TokenBatch) -> Tensor:
        """``(B, R)`` value of the state before each response token (position ``P + t − 1``)."""
        ...

    def save(self, path: str) -> None:
        """Write an HF model directory."""
        ...


@runtime_checkable
class RewardModel(Protocol):
    """A scalar score per (prompt, response)."""

    def score(self, inp: RewardInput) -> Tensor:
        """``(B,)`` float32 scores, one per row of ``inp``."""
        ...


@runtime_checkable
class AdvantageEstimator(Protocol):
    """Advantages (and value targets) from per-token rewards.

    Every estimator takes the same :class:`AdvantageInput`, so callers never special-case one.
    """

    needs_values: bool
    """True when the estimator needs a value model (``gae``); critic-free ones build none."""
    min_samples_per_prompt: int
    """Smallest valid ``rollout.samples_per_prompt`` (2 for group baselines)."""
    default_samples_per_prompt: int
    """``rollout.samples_per_prompt`` when the recipe leaves it ``null``."""
    needs_greedy_baseline: bool
    """True when ``AdvantageInput.baseline`` must hold the greedy response's reward (ReMax)."""

    def __call__(self, inp: AdvantageInput) -> AdvantageOutput:
        """Advantages ``(B, R)`` and returns ``(B, R)`` or ``None``."""
        ...


@runtime_checkable
class Objective(Protocol):
    """A per-token policy loss."""

    aggregation: str
    """How the caller reduces the per-token loss: ``token_mean``, ``seq_mean_token_mean``,
    ``seq_mean_token_sum`` or ``seq_mean_token_sum_norm``."""

    def __call__(self, inp: ObjectiveInput) -> LossOutput:
        """Per-token loss ``(B, R)`` (0 on padding) and metrics (e.g. ``clip_frac``)."""
        ...


@runtime_checkable
class KLEstimator(Protocol):
    """A per-token estimate of KL(π ‖ π_ref) from ``Δ = log π − log π_ref``."""

    needs_logits: bool
    """True when the estimator needs full-vocabulary logits (``full``)."""

    def __call__(self, inp: KLInput) -> Tensor:
        """``(B, R)`` per-token KL estimate (unmasked; callers multiply by the response mask)."""
        ...


@runtime_checkable
class KLController(Protocol):
    """Owns the KL coefficient β and how it changes."""

    @property
    def coef(self) -> float:
        """The current β."""
        ...

    def update(self, kl: float, n_steps: int) -> None:
        """Observe the mean per-sequence KL (nats, summed over tokens) of ``n_steps`` new episodes."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """State saved in checkpoints."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        ...


@runtime_checkable
class RewardTransform(Protocol):
    """Maps per-sequence scores to per-sequence scores before the KL penalty is added."""

    def __call__(self, inp: ShapingInput) -> Tensor:
        """``(B,)`` transformed scores."""
        ...


@runtime_checkable
class ExtraLoss(Protocol):
    """An auxiliary loss added to every policy update (e.g. ``ptx``)."""

    coef: float
    """Weight of the loss; 0 switches it off (it is then not computed)."""

    def __call__(self, policy: Policy, step: int) -> LossOutput:
        """Scalar loss already multiplied by ``coef``, and metrics (unweighted)."""
        ...


@runtime_checkable
class GoldJudge(Protocol):
    """A programmatic judge that knows the truth (the simulated world's)."""

    def score(self, prompts: Sequence[Prompt], completions: Sequence[Completion]) -> list[float]:
        """One score per response, higher is better."""
        ...


@runtime_checkable
class Task(Protocol):
    """Where prompts, demonstrations, rankings and pretraining text come from."""

    gold: GoldJudge | None
    """The gold judge, or ``None`` for tasks without one (real data)."""

    def prompts(self, split: str) -> Sequence[Prompt]:
        """Prompts of ``split``: ``"rl"`` (RL training) or ``"eval"`` (held out from every stream)."""
        ...

    def demonstrations(self) -> Sequence[Demonstration]:
        """SFT demonstrations."""
        ...

    def rankings(self, split: str, sample: SampleFn) -> Sequence[Ranking]:
        """Ranked responses for the reward model: ``"train"`` or ``"eval"`` (held out).

        ``sample(prompts, k)`` draws responses from the SFT policy, for tasks whose labeler ranks
        policy samples; file-based tasks ignore it.
        """
        ...

    def pretraining_text(self, split: str) -> Sequence[str]:
        """Plain text for the base LM and for ptx: ``"train"`` or ``"eval"`` (held out)."""
        ...


@runtime_checkable
class Logger(Protocol):
    """Marker for Lightning loggers built from the ``loggers`` recipe list."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...


__all__ = [
    "AdvantageEstimator",
    "Demonstration",
    "ExtraLoss",
    "GoldJudge",
    "KLController",
    "KLEstimator",
    "Logger",
    "Objective",
    "Policy",
    "RewardModel",
    "RewardTransform",
    "SampleFn",
    "Task",
    "ValueModel",
]
