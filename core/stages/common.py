"""What every stage shares: the stage context, the Lightning Trainer factory, seeding, tokenizing
prompts and responses into the one sequence layout, and the learning-rate schedule."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from ..config import Recipe
from ..registry import BuildContext
from ..types import Completion, Prompt, TokenBatch, position_ids_from_mask

MODEL_SUBDIR = "model"


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

    def build_context(self, **kwargs: Any) -> BuildContext:
        """A BuildContext for component factories of this stage."""
        extras = {"run_name": self.run_name, "stage": self.name}
        extras.update(kwargs.pop("extras", {}))
        return BuildContext(
            registry=self.recipe.registry,
            stage_dir=str(self.stage_dir),
            paths=dict(self.paths),
            extras=extras,
            **kwargs,
        )

    def build_policy(self, model: str) -> Any:
        """The recipe's Policy component loaded from ``model`` (a policy config names its weights
        in a ``model`` field)."""
        choice = self.recipe.choice("policy")
        config = dataclasses.replace(choice.config, model=model) if choice.config is not None else None
        return self.recipe.registry.build(
            "policy", choice.name, config, self.build_context(seed=self.recipe.seed)
        )

    def build_task(self) -> Any:
        """The recipe's Task."""
        choice = self.recipe.choice("task")
        return self.recipe.registry.build(
            "task", choice.name, choice.config, self.build_context(seed=self.recipe.seed)
        )


def is_global_zero() -> bool:
    """True in the process that writes files (rank 0, or the only process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


def make_trainer(ctx: StageContext, *, callbacks: Sequence[Any] = (), **kwargs: Any) -> pl.Trainer:
    """A ``lightning.Trainer`` for a stage: the recipe's ``trainer`` block, the recipe's loggers
    (CSV always) writing into the stage dir, and the stage's own arguments (``max_steps`` …)."""
    recipe = ctx.recipe
    trainer_args: dict[str, Any] = dict(recipe.cfg.trainer)
    loggers = []
    names = [c.name for c in recipe.loggers]
    bctx = ctx.build_context()
    if "csv" not in names:
        loggers.append(recipe.registry.build("logger", "csv", _default_config(recipe, "logger", "csv"), bctx))
    for choice in recipe.loggers:
        loggers.append(recipe.registry.build("logger", choice.name, choice.config, bctx))
    trainer_args.setdefault("enable_model_summary", False)
    trainer_args.setdefault("num_sanity_val_steps", 0)
    trainer_args.setdefault("log_every_n_steps", 1)
    trainer_args.update(kwargs)
    return pl.Trainer(
        logger=loggers, callbacks=list(callbacks), default_root_dir=str(ctx.stage_dir), **trainer_args
    )


def _default_config(recipe: Recipe, kind: str, name: str) -> Any:
    spec = recipe.registry.get(kind, name)
    return spec.config() if spec.config else None


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (Lightning's helper)."""
    pl.seed_everything(seed, workers=True, verbose=False)


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


# --------------------------------------------------------------------------------------------
# Tokenizing into the one layout: [left-padded prompt | right-padded response]
# --------------------------------------------------------------------------------------------


def encode_prompts(tokenizer: Any, texts: Sequence[str], max_len: int) -> tuple[Tensor, Tensor]:
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
    tokenizer: Any, completions: Sequence[Completion], max_len: int
) -> tuple[Tensor, Tensor]:
    """Right-padded response ids ``(B, R)`` (EOS appended when the completion ended) and mask."""
    rows = []
    for c in completions:
        ids = tokenizer(c.text, add_special_tokens=False)["input_ids"]
        ids = ids[: max_len - 1] + [tokenizer.eos_token_id] if c.ended else ids[:max_len]
        rows.append(ids or [tokenizer.eos_token_id])
    r = max(len(x) for x in rows)
    ids = torch.full((len(rows), r), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), r), dtype=torch.float)
    for i, x in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1.0
    return ids, mask


def encode_pairs(
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[Completion],
    max_prompt: int,
    max_response: int,
) -> TokenBatch:
    """A TokenBatch of prompt + response (the layout rollouts use, so scores match in RL)."""
    pids, pmask = encode_prompts(tokenizer, prompts, max_prompt)
    rids, rmask = encode_responses(tokenizer, completions, max_response)
    input_ids = torch.cat([pids, rids], 1)
    attention = torch.cat([pmask, rmask.long()], 1)
    return TokenBatch(input_ids, attention, position_ids_from_mask(attention), rmask, pids.shape[1])


def prompt_texts(prompts: Sequence[Prompt]) -> list[str]:
    return [p.text for p in prompts]


def to_device(batch: TokenBatch, device: torch.device) -> TokenBatch:
    """Move a TokenBatch's tensors to ``device``."""
    return TokenBatch(
        batch.input_ids.to(device),
        batch.attention_mask.to(device),
        batch.position_ids.to(device),
        batch.response_mask.to(device),
        batch.prompt_len,
    )


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (rank 0 only)."""
    if not is_global_zero():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float))
    os.replace(tmp, path)


class Timer:
    """Accumulates seconds per named phase: ``with timer("rollout"): ...``."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._name = ""
        self._start = 0.0

    def __call__(self, name: str) -> Timer:
        self._name = name
        return self

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.totals[self._name] = self.totals.get(self._name, 0.0) + time.perf_counter() - self._start

    def pop(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out


def batched(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """Consecutive chunks of ``size``."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def model_summary(model: torch.nn.Module) -> dict[str, Any]:
    """Parameter count and class of a model (for a stage's summary)."""
    from ..models import count_parameters

    return {"params": count_parameters(model), "class": type(model).__name__}


def fit(trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
    """``trainer.fit`` that turns Lightning's graceful Ctrl-C handling back into KeyboardInterrupt
    (so the launcher exits with 130 and the run is marked interrupted, not finished)."""
    trainer.fit(*args, **kwargs)
    if trainer.interrupted:
        raise KeyboardInterrupt
