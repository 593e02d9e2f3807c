"""What every stage shares: the stage context, the Lightning Trainer factory, seeding, the
learning-rate schedule, and the one sequence layout — tokenizing prompts, responses and documents,
sampling and scoring in chunks."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import lightning.pytorch as pl
import torch
from torch import Tensor

from .config import Recipe
from .errors import DataError
from .fields import field_for_role
from .registry import BuildContext
from .types import Completion, Prompt, RewardInput, TokenBatch, join_prompt_response

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .protocols import Policy, RewardModel, Task

MODEL_SUBDIR = "model"
T = TypeVar("T")


@dataclass
class StageContext:
    """What a stage gets from the runner.

    Attributes:
        recipe: the validated recipe.
        name: the stage name.
        stage_dir: where the stage writes (``metrics.csv``, ``checkpoints/``, ``model/`` …).
        paths: output model dirs of the stages this one depends on (``{"sft": ".../model"}``).
        resume: continue from ``stage_dir/checkpoints/last.ckpt`` if present.
        run_name: the run directory's name (loggers use it).
    """

    recipe: Recipe
    name: str
    stage_dir: Path
    paths: dict[str, str] = field(default_factory=dict)
    resume: bool = False
    run_name: str = "run"

    @property
    def model_dir(self) -> Path:
        return self.stage_dir / MODEL_SUBDIR

    def resolve(self, value: str, key: str) -> str:
        """A model path from the recipe: ``@stage`` becomes that stage's output model dir."""
        return self.build_context().resolve(value, key)

    def build_context(self, **fields: Any) -> BuildContext:
        """A BuildContext for component factories of this stage (``fields`` fill its attributes)."""
        fields.setdefault("seed", self.recipe.seed)
        return BuildContext(
            registry=self.recipe.registry,
            stage=self.name,
            stage_dir=self.stage_dir,
            run_name=self.run_name,
            paths=dict(self.paths),
            **fields,
        )

    def build(self, key: str, config: object = None, **fields: Any) -> Any:
        """Build the component the recipe selects at ``key`` (``"policy"``, ``"kl.estimator"`` …)."""
        choice = self.recipe.choice(key)
        conf = choice.config if config is None else config
        return self.recipe.registry.build(choice.kind, choice.name, conf, self.build_context(**fields))

    def build_policy(self, weights: str) -> Policy:
        """The recipe's Policy component loaded from ``weights`` (the config field marked
        ``model_path="weights"`` is replaced; the reference field is cleared)."""
        choice = self.recipe.choice("policy")
        conf = choice.config
        if conf is not None:
            cls = type(conf)
            changes: dict[str, object] = {}
            if (f := field_for_role(cls, "weights")) is not None:
                changes[f] = weights
            if (f := field_for_role(cls, "reference")) is not None:
                changes[f] = None
            conf = dataclasses.replace(conf, **changes)
        return self.build("policy", conf)

    def build_task(self) -> Task:
        """The recipe's Task."""
        return self.build("task")


def devices(recipe: Recipe) -> int:
    """Processes per stage from ``trainer.devices`` (1 unless a positive int)."""
    n = recipe.cfg.trainer.get("devices", 1)
    return int(n) if isinstance(n, int) and n > 0 else 1


def make_trainer(ctx: StageContext, *, callbacks: Sequence[pl.Callback] = (), **kwargs: Any) -> pl.Trainer:
    """A ``lightning.Trainer`` for a stage: the recipe's ``trainer`` block, its loggers (plus every
    logger declaring ``always_on``) writing into the stage dir, and the stage's own arguments."""
    recipe = ctx.recipe
    reg = recipe.registry
    trainer_args: dict[str, Any] = dict(recipe.cfg.trainer)
    chosen = {c.name for c in recipe.loggers}
    bctx = ctx.build_context()
    loggers = [
        reg.build(
            "logger", name, reg.get("logger", name).config() if reg.get("logger", name).config else None, bctx
        )
        for name in reg.names("logger")
        if reg.needs("logger", name).always_on and name not in chosen
    ]
    loggers += [reg.build("logger", c.name, c.config, bctx) for c in recipe.loggers]
    trainer_args.setdefault("enable_model_summary", False)
    trainer_args.setdefault("num_sanity_val_steps", 0)
    trainer_args.setdefault("log_every_n_steps", 1)
    trainer_args.update(kwargs)
    return pl.Trainer(
        logger=loggers, callbacks=list(callbacks), default_root_dir=str(ctx.stage_dir), **trainer_args
    )


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (Lightning's helper)."""
    pl.seed_everything(seed, workers=True, verbose=False)


def fit(trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
    """``trainer.fit`` that turns Lightning's graceful Ctrl-C handling back into KeyboardInterrupt
    (so the launcher exits with 130 and the run is marked interrupted, not finished)."""
    trainer.fit(*args, **kwargs)
    if trainer.interrupted:
        raise KeyboardInterrupt


def lr_lambda(
    total_steps: int, warmup_steps: int, schedule: str = "cosine", min_ratio: float = 0.1
) -> Callable[[int], float]:
    """Multiplier of the peak LR at step ``s``: linear warmup, then cosine to ``min_ratio`` (or constant)."""

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class Timer:
    """Accumulates seconds per named phase: ``with timer("rollout"): ...``."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def __call__(self, name: str) -> _Phase:
        return _Phase(self, name)

    def pop(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out


class _Phase:
    def __init__(self, timer: Timer, name: str) -> None:
        self.timer, self.name, self.start = timer, name, 0.0

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        t = self.timer.totals
        t[self.name] = t.get(self.name, 0.0) + time.perf_counter() - self.start


def batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive chunks of ``size``."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


# --------------------------------------------------------------------------------------------
# Tokenizing into the one layout: [left-padded prompt | right-padded response]
# --------------------------------------------------------------------------------------------


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int
) -> tuple[Tensor, Tensor]:
    """Left-padded prompt ids ``(B, P)`` and mask; prompts longer than ``max_len`` keep their end."""
    rows = [tokenizer(t, add_special_tokens=True)["input_ids"][-max_len:] for t in texts]
    p = max(len(r) for r in rows)
    ids = torch.full((len(rows), p), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), p), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, p - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, p - len(r) :] = 1
    return ids, mask


def encode_responses(
    tokenizer: PreTrainedTokenizerBase, completions: Sequence[Completion], max_len: int
) -> tuple[Tensor, Tensor]:
    """Right-padded response ids ``(B, R)`` (EOS appended when the completion ended) and mask."""
    rows = []
    for c in completions:
        ids = tokenizer(c.text, add_special_tokens=False)["input_ids"]
        ids = ids[: max_len - 1] + [tokenizer.eos_token_id] if c.ended else ids[:max_len]
        rows.append(ids or [tokenizer.eos_token_id])
    ids, mask = pad_right(rows, tokenizer.pad_token_id)
    return ids, mask.float()


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[Completion],
    max_prompt: int,
    max_response: int,
) -> TokenBatch:
    """A TokenBatch of prompt + response (the layout rollouts use, so scores match in RL)."""
    pids, pmask = encode_prompts(tokenizer, prompts, max_prompt)
    rids, rmask = encode_responses(tokenizer, completions, max_response)
    return join_prompt_response(pids, pmask, rids, rmask)


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ``(B, T)`` ids and long mask."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def tokenize_docs(tokenizer: PreTrainedTokenizerBase, docs: Sequence[str], max_len: int) -> list[list[int]]:
    """Each document as BOS + tokens + EOS, truncated to ``max_len``."""
    return [
        (tokenizer(d, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id])[:max_len]
        for d in docs
    ]


def pack_docs(tokenizer: PreTrainedTokenizerBase, docs: Sequence[str], seq_len: int, what: str) -> Tensor:
    """``(N, seq_len)`` chunks of the documents tokenized as ``BOS … EOS`` and concatenated;
    a :class:`DataError` naming ``what`` when there is not one full chunk."""
    stream: list[int] = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    n = len(stream) // seq_len
    if n == 0:
        raise DataError(f"{what}: {len(stream)} tokens is fewer than one sequence of {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.no_grad()
def sample_completions(
    policy: Policy,
    prompts: Sequence[Prompt],
    *,
    max_prompt: int,
    max_new_tokens: int,
    temperature: float,
    greedy: bool = False,
    batch_size: int = 256,
) -> list[Completion]:
    """One completion per prompt from ``policy``, generated in chunks of ``batch_size``."""
    out: list[Completion] = []
    for chunk in batched(list(prompts), batch_size):
        ids, mask = encode_prompts(policy.tokenizer, [p.text for p in chunk], max_prompt)
        out += policy.generate(
            ids, mask, max_new_tokens=max_new_tokens, temperature=temperature, greedy=greedy
        ).completions
    return out


@torch.no_grad()
def score_completions(
    reward: RewardModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    completions: Sequence[Completion],
    *,
    max_prompt: int,
    max_response: int,
    batch_size: int = 128,
) -> Tensor:
    """``(N,)`` reward scores of prompt/completion pairs, in chunks (the RL tokenization)."""
    out = []
    for lo in range(0, len(prompts), batch_size):
        ps, cs = list(prompts[lo : lo + batch_size]), list(completions[lo : lo + batch_size])
        tb = encode_pairs(tokenizer, [p.text for p in ps], cs, max_prompt, max_response)
        out.append(reward.score(RewardInput(prompts=ps, completions=cs, batch=tb)).float())
    return torch.cat(out) if out else torch.zeros(0)


# Trainer keys that do not change what a stage produces (left out of cache keys).
COSMETIC_TRAINER_KEYS = frozenset(
    {"enable_progress_bar", "enable_model_summary", "log_every_n_steps", "profiler", "barebones"}
)


def cache_blocks(recipe: Recipe, *sections: str) -> dict[str, object]:
    """The resolved recipe blocks ``sections`` for a stage's cache key (``trainer`` without its
    cosmetic keys)."""
    cfg = recipe.plain()
    out: dict[str, object] = {}
    for name in sections:
        value = cfg.get(name)
        if name == "trainer" and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in COSMETIC_TRAINER_KEYS}
        out[name] = value
    return out
