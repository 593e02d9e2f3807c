"""The component interfaces. Each is a small :class:`typing.Protocol`: implement the methods, no
base class needed. Every built component is checked against its kind's protocol (methods present,
parameters matching) by the registry; a mismatch is a one-line error naming the plugin.

Every method that the RL step calls takes **one** input container from :mod:`instructrl.core.types`
(``ObjectiveInput``, ``TransformInput`` …), extended additively.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor

from .types import (
    AdvantageInput,
    AdvantageOutput,
    Completion,
    ControllerInput,
    Demonstration,
    ExtraLossInput,
    Generation,
    KLInput,
    LossOutput,
    ObjectiveInput,
    PolicyOutput,
    Prompt,
    Ranking,
    RewardInput,
    TokenBatch,
    TransformInput,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .config import Recipe
    from .training import StageContext

SampleFn = Callable[[Sequence[Prompt], int], list[list[Completion]]]
"""``sample(prompts, k)`` → for each prompt, ``k`` completions sampled from the current policy."""

StateDict = dict[str, object]


@runtime_checkable
class Stateful(Protocol):
    """A component with state that checkpoints save and resume restores (declare
    ``needs=Needs(stateful=True)`` when registering). A component that samples keeps its random
    generator's state here, so a resumed run continues the same random stream."""

    def state_dict(self) -> StateDict:
        """Plain data (tensors, numbers, strings, lists, dicts) describing the state."""

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore :meth:`state_dict`."""


class Policy(Protocol):
    """A causal language model that samples responses and scores given ones."""

    model: torch.nn.Module
    """The trainable module (optimised, checkpointed and saved)."""
    tokenizer: PreTrainedTokenizerBase
    """The HF tokenizer: ``pad_token_id`` and ``eos_token_id`` are set and distinct."""

    def generate(
        self, input_ids: Tensor, attention_mask: Tensor, *, max_new_tokens: int, temperature: float, greedy: bool = False
    ) -> Generation:  # fmt: skip
        """Sample responses to left-padded prompts ``(B, P)``.

        Sampling is from ``softmax(logits / temperature)`` over the full vocabulary (no top-k/top-p).
        Tokens after EOS are padding. Returns a :class:`Generation` whose batch is ``(B, P + R)``;
        a sampler may also fill ``Generation.logprobs`` (fp32, at ``temperature``, from the sampling
        pass): an on-policy fp32 RL update then uses them as the old logprobs instead of a forward.
        """

    def forward(self, batch: TokenBatch, *, temperature: float, return_logits: bool = False) -> PolicyOutput:
        """Per-token logprobs ``(B, R)`` and entropy ``(B, R)`` of the batch's responses under
        ``softmax(logits / temperature)``, with the batch's position ids; grads flow when enabled."""

    def lm_loss(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Mean next-token cross-entropy (nats per token, temperature 1) over the real tokens of
        ``(B, T)`` text; a scalar."""

    def reference(self) -> Policy:
        """A frozen policy to measure KL against (InstructGPT: the SFT model the policy starts from)."""

    def save(self, path: str) -> None:
        """Write an HF model directory (model + tokenizer) loadable by ``AutoModelForCausalLM``."""


class ValueModel(Protocol):
    """Per-token state values for the critic."""

    model: torch.nn.Module

    def values(self, batch: TokenBatch) -> Tensor:
        """``(B, R)`` value of the state before each response token (position ``P + t − 1``)."""

    def save(self, path: str) -> None:
        """Write an HF model directory."""


class RewardModel(Protocol):
    """A scalar score per (prompt, response)."""

    def score(self, inp: RewardInput) -> Tensor:
        """``(B,)`` float32 scores, one per row of ``inp``."""

    def demo_mean(self) -> float | None:
        """The model's mean score on the SFT demonstrations if it knows it (the RM stage records
        it; ``demo_bias`` uses it), else ``None``."""


class AdvantageEstimator(Protocol):
    """Advantages (and value targets) from per-token rewards. Declare ``values``,
    ``greedy_baseline`` and the samples-per-prompt bounds in :class:`~instructrl.core.types.Needs`."""

    def __call__(self, inp: AdvantageInput) -> AdvantageOutput:
        """Advantages ``(B, R)`` and returns ``(B, R)`` or ``None``."""


class Objective(Protocol):
    """A per-token policy loss."""

    aggregation: str
    """How the caller reduces the per-token loss (:data:`instructrl.core.ops.Aggregation`)."""

    def __call__(self, inp: ObjectiveInput) -> LossOutput:
        """Per-token loss ``(B, R)`` (0 on padding) and metrics (e.g. ``clip_frac``)."""


class KLEstimator(Protocol):
    """A per-token estimate of KL(π ‖ π_ref) from ``Δ = log π − log π_ref`` (declare
    ``Needs(logits=True)`` for estimators that need full-vocabulary logits)."""

    def __call__(self, inp: KLInput) -> Tensor:
        """``(B, R)`` per-token KL estimate (unmasked; callers multiply by the response mask)."""


class KLController(Protocol):
    """Owns the KL coefficient β and how it changes. Its state is checkpointed (it is always
    treated as :class:`Stateful`)."""

    @property
    def coef(self) -> float:
        """The current β."""

    def update(self, inp: ControllerInput) -> None:
        """Observe one iteration's KL (per sequence and mean) and move β."""

    def state_dict(self) -> StateDict:
        """State saved in checkpoints."""

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore :meth:`state_dict`."""


class RewardTransform(Protocol):
    """Maps per-sequence scores to per-sequence scores before the KL penalty is added."""

    def __call__(self, inp: TransformInput) -> Tensor:
        """``(B,)`` transformed scores."""


class ExtraLoss(Protocol):
    """An auxiliary loss added to every policy update (e.g. ``ptx``), called on every micro-batch."""

    coef: float
    """Weight of the loss; a block whose ``coef`` is 0 switches the loss off (it is not built)."""

    def __call__(self, inp: ExtraLossInput) -> LossOutput:
        """Scalar loss already multiplied by ``coef`` and by the micro-batch's share, and metrics
        (unweighted; logged as ``<name>/<metric>``)."""


class GoldJudge(Protocol):
    """A programmatic judge that knows the truth (the simulated world's)."""

    def score(self, prompts: Sequence[Prompt], completions: Sequence[Completion]) -> list[float]:
        """One score per response, higher is better."""

    def parts(self, prompts: Sequence[Prompt], completions: Sequence[Completion]) -> dict[str, list[float]]:
        """Named additive parts of the score per response (``{}`` if it has none); the evaluation
        logs each as ``eval/gold_<part>`` (and ``…_sft``)."""


class Task(Protocol):
    """Where prompts, demonstrations, rankings and pretraining text come from."""

    gold: GoldJudge | None
    """The gold judge, or ``None`` for tasks without one (real data)."""

    def prompts(self, split: str) -> Sequence[Prompt]:
        """Prompts of ``split``: ``"rl"`` (RL training) or ``"eval"`` (held out from every stream)."""

    def demonstrations(self) -> Sequence[Demonstration]:
        """SFT demonstrations."""

    def rankings(self, split: str, sample: SampleFn) -> Sequence[Ranking]:
        """Ranked responses for the reward model: ``"train"`` or ``"eval"`` (held out).

        ``sample(prompts, k)`` draws responses from the SFT policy, for tasks whose labeler ranks
        policy samples; file-based tasks ignore it.
        """

    def pretraining_text(self, split: str) -> Sequence[str]:
        """Plain text for the base LM and for ptx: ``"train"`` or ``"eval"`` (held out)."""

    def pair_kind(self, prompt: Prompt, a: Completion, b: Completion) -> str | None:
        """A label for a ranked pair (the RM's accuracy is also reported per label), or ``None``."""


class Logger(Protocol):
    """A Lightning logger (``lightning.pytorch.loggers.Logger``) built for one stage."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...


class Stage(Protocol):
    """One stage of the pipeline (pretrain, sft, rm, rl, eval … or yours), registered as an object.

    The runner plans stages from these methods alone — nothing here may train or load a model —
    and calls :meth:`run` to execute one.
    """

    sections: Mapping[str, type]
    """Recipe sections this stage owns: ``{section: config dataclass}`` (validated in every recipe)."""

    def inputs(self, recipe: Recipe) -> dict[str, object]:
        """``{recipe key: value}`` of every block the stage reads model paths from; ``@stage``
        strings in the values are the stage's dependencies."""

    def cache_key(self, recipe: Recipe) -> Mapping[str, object] | None:
        """What determines the stage's output besides its inputs (hashed into the stage-cache key),
        or ``None`` when the stage is not cached (it runs in the run dir)."""

    def skip(self, recipe: Recipe) -> tuple[str, str] | None:
        """``(reason, output dir)`` when the recipe supplies the output instead (e.g. ``base.model``
        for pretraining), else ``None``."""

    def check(self, recipe: Recipe) -> None:
        """Raise a one-line ``ConfigError`` for settings that cannot go together (run before
        anything is built, ``--dry-run`` included)."""

    def describe(self, recipe: Recipe) -> dict[str, object]:
        """Derived quantities for ``--dry-run`` (batch arithmetic, sizes)."""

    def run(self, ctx: StageContext) -> dict[str, object]:
        """Run the stage into ``ctx.stage_dir``; return its summary (flat ``<stage>/<metric>`` keys)."""


class Command(Protocol):
    """A launcher sub-command (``instructrl <name> …``), registered as an object."""

    key_value_options: tuple[str, ...]
    """Options whose value is ``KEY=V`` text (so the launcher does not take it for an override)."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the command's arguments."""

    def run(self, args: argparse.Namespace) -> int:
        """Run; return the exit code."""
