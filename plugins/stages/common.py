"""The stage toolkit: what the built-in stages share, and what a stage plugin uses to train the
way they do — the Lightning Trainer factory (the recipe's ``trainer`` block, precision and
loggers, atomic checkpoint writes), resumable checkpoints and data order, seeding, the
learning-rate schedule, and the one sequence layout (tokenizing prompts, responses and
documents, sampling and scoring in chunks)."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import lightning.pytorch as pl
import torch
from instructrl.core import faults
from instructrl.core.config import Recipe
from instructrl.core.config.validate import planned_stages
from instructrl.core.errors import ConfigError, DataError
from instructrl.core.fields import model_path_fields
from instructrl.core.io import atomic_file, clean_stale_temps
from instructrl.core.ops import all_reduce_sum
from instructrl.core.training import (
    CHECKPOINT_SUBDIR,
    LAST_CHECKPOINT,
    Interrupted,
    StageContext,
    StopNow,
    reclaim_sigterm,
    stop_requested,
)
from instructrl.core.types import Completion, Prompt, RewardInput, TokenBatch, join_prompt_response
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

if TYPE_CHECKING:
    from instructrl.core.protocols import Policy, RewardModel
    from transformers import PreTrainedTokenizerBase

T = TypeVar("T")
CHECKPOINTS_PER_STAGE = 10
"""An upstream stage (pretrain, SFT, RM) checkpoints every epoch and about this many times in all."""


@runtime_checkable
class ResumableLogger(Protocol):
    """A logger that keeps its rows across a resume (``csv``): ``fit`` sets ``resuming`` before a
    resumed ``trainer.fit``, the checkpoint calls ``resume_at(step)`` once it knows the step."""

    resuming: bool

    def resume_at(self, step: int) -> None: ...


def make_trainer(
    ctx: StageContext,
    *,
    callbacks: Sequence[pl.Callback] = (),
    checkpoint: StageCheckpoint | None = None,
    **kwargs: Any,
) -> pl.Trainer:
    """A ``lightning.Trainer`` for a stage: the recipe's ``trainer`` block and resolved precision,
    its loggers (plus every logger declaring ``always_on``) writing into the stage dir, atomic
    checkpoint writes (:class:`AtomicCheckpointIO`), the stage's :class:`StageCheckpoint` if it
    has one, and the stage's own arguments (``max_steps`` …)."""
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
    trainer_args["precision"] = recipe.derived.precision
    trainer_args["enable_checkpointing"] = checkpoint is not None
    trainer_args.update(kwargs)
    cbs = [*callbacks, *([checkpoint] if checkpoint is not None else [])]
    return pl.Trainer(
        logger=loggers, callbacks=cbs, plugins=[AtomicCheckpointIO()], default_root_dir=str(ctx.stage_dir),
        **trainer_args,
    )  # fmt: skip


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (Lightning's helper)."""
    pl.seed_everything(seed, workers=True, verbose=False)


def fit(trainer: pl.Trainer, *args: Any, ckpt_path: str | None = None, **kwargs: Any) -> dict[str, float]:
    """``trainer.fit`` (resuming from ``ckpt_path`` if given) that turns a stop on a signal into
    :class:`Interrupted` (so the launcher exits 130 / 143 and marks the run interrupted, not
    finished); returns the stage's final metrics — those logged now, over those the checkpoint
    resumed from recorded."""
    for loader in [*args, *kwargs.values()]:
        if isinstance(loader, DataLoader) and isinstance(loader.batch_sampler, EpochBatchSampler):
            loader.batch_sampler.trainer = trainer
    for logger in trainer.loggers:
        if ckpt_path is not None and isinstance(logger, ResumableLogger):
            logger.resuming = True  # keep metrics.csv's rows
    try:
        trainer.fit(*args, ckpt_path=ckpt_path, **kwargs)
    except StopNow:
        raise Interrupted(stop_requested() or signal.SIGINT) from None
    if trainer.interrupted:
        raise Interrupted(stop_requested() or signal.SIGINT)
    ckpt = next((c for c in trainer.callbacks if isinstance(c, StageCheckpoint)), None)
    metrics = dict(ckpt.restored) if ckpt is not None else {}
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    return metrics


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, written atomically (temporary file in the same directory,
    fsync, rename: a killed write never leaves a corrupt ``last.ckpt``) and loaded with
    ``torch.load(..., weights_only=True)`` (no pickled objects)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as f:
            torch.save(checkpoint, f)
            faults.checkpoint_write(path, f)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location or _keep_location, weights_only=True)


def _keep_location(storage: Any, location: Any) -> Any:
    return storage


def rng_state() -> dict[str, Any]:
    """Every global random stream (torch CPU and CUDA, python, numpy) as tensors and plain data."""
    import numpy as np

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore :func:`rng_state`."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of a seeded permutation per epoch (``seed``, epoch → order; no random state to carry),
    this process's share of it, resuming in the middle of an epoch: when the trainer restored a
    checkpoint taken after ``k`` batches of an epoch, the epoch's iterator starts at batch ``k``.
    :func:`fit` binds it to its trainer."""

    def __init__(
        self, n: int, batch_size: int, *, seed: int, shuffle: bool = True, drop_last: bool = False
    ) -> None:
        self.n, self.batch_size, self.seed, self.shuffle, self.drop_last = (
            n,
            batch_size,
            seed,
            shuffle,
            drop_last,
        )
        self.trainer: pl.Trainer | None = None

    def _world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.world_size, t.global_rank) if t is not None else (1, 0)

    def _per_process(self) -> int:
        world, _ = self._world()
        return self.n // world if world > 1 else self.n

    def __len__(self) -> int:
        m = self._per_process()
        return m // self.batch_size if self.drop_last else math.ceil(m / self.batch_size)

    def batches(self, epoch: int) -> list[list[int]]:
        """Every batch of ``epoch`` on this process."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=gen).tolist()
        else:
            order = list(range(self.n))
        world, rank = self._world()
        mine = order[rank::world][: self._per_process()]
        out = [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        return out[: len(self)]

    def __iter__(self) -> Iterator[list[int]]:
        t = self.trainer
        epoch = t.current_epoch if t is not None else 0
        done = t.fit_loop.epoch_loop.batch_progress.current.processed if t is not None else 0
        yield from self.batches(epoch)[done:]


def resumable_loader(
    dataset: Dataset[Any] | Sequence[Any],
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    drop_last: bool = False,
    collate_fn: Callable[[Any], Any] | None = None,
) -> DataLoader[Any]:
    """A training DataLoader over an :class:`EpochBatchSampler` (the trainer needs
    ``use_distributed_sampler=False``: the sampler shards by process itself)."""
    sampler = EpochBatchSampler(len(dataset), batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last)  # type: ignore[arg-type]
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed)
    )  # type: ignore[arg-type]


def eval_loader(
    dataset: Any, batch_size: int, *, collate_fn: Callable[[Any], Any] | None = None
) -> DataLoader[Any]:
    """A validation DataLoader in a fixed order with its own generator (iterating it draws nothing
    from the global random stream, so validation does not shift the training stream)."""
    return DataLoader(
        dataset, batch_size=batch_size, collate_fn=collate_fn, generator=torch.Generator().manual_seed(0)
    )


def _between_optimizer_steps(pl_module: pl.LightningModule) -> bool:
    """No gradient is waiting for an optimiser step (a checkpoint here is resumable exactly): under
    manual optimisation (RL, where several micro-batches may make one step), every gradient is
    ``None`` (the optimisers zero them with ``set_to_none`` after stepping); Lightning's
    accumulation is checked by the caller."""
    if pl_module.automatic_optimization:
        return True
    return all(p.grad is None for p in pl_module.parameters())


def checkpoint_interval(total_steps: int) -> int:
    """Optimiser steps between the checkpoints of an upstream stage (:data:`CHECKPOINTS_PER_STAGE`)."""
    return max(1, math.ceil(total_steps / CHECKPOINTS_PER_STAGE))


def stage_checkpoint(ctx: StageContext, total_steps: int) -> StageCheckpoint:
    """The checkpoint of an upstream stage: every epoch end and every :func:`checkpoint_interval` steps."""
    return StageCheckpoint(
        ctx.stage_dir / CHECKPOINT_SUBDIR,
        ctx.name,
        every_n_steps=checkpoint_interval(total_steps),
        every_n_epochs=1,
    )


def resume_path(ctx: StageContext) -> str | None:
    """``<stage dir>/checkpoints/last.ckpt`` when the run resumes and it exists."""
    last = ctx.stage_dir / CHECKPOINT_SUBDIR / LAST_CHECKPOINT
    return str(last) if ctx.resume and last.is_file() else None


class StageCheckpoint(Checkpoint):
    """A stage's resumable checkpoint, ``<stage dir>/checkpoints/last.ckpt``.

    Taken every ``every_n_steps`` optimiser steps, every ``every_n_epochs`` epochs, at the end of
    training, and at the first safe point after a stop signal (the end of an optimiser step: no
    gradient accumulated for the next one, see :func:`_between_optimizer_steps`; in RL also inside an
    iteration, whose rollouts the module saves). It holds everything Lightning saves
    (model, optimisers, schedulers, loop progress, the module's ``on_save_checkpoint`` state), every
    global random stream, the logger step it was taken at and the stage's metrics.

    A checkpoint is *captured* where Lightning expects one (``on_train_batch_end`` /
    ``on_train_epoch_end``, so its loops restart exactly there) and *written* at the next point
    after the rows of that step are logged: the ``metrics.csv`` rows are flushed first, so the
    rows on disk always cover the last checkpoint. On resume, rows logged after its step are dropped
    (they are logged again), the random streams are restored, and the metrics it recorded are
    returned by :func:`fit` for keys the resumed session does not log again.
    """

    def __init__(
        self,
        dirpath: str | Path,
        stage: str,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
    ) -> None:
        self.dirpath = Path(dirpath)
        self.stage = stage
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.restored: dict[str, float] = {}  # metrics recorded by the checkpoint resumed from
        self.written = 0
        self._trainer: pl.Trainer | None = None
        self._log_step = -1
        self._pending: dict[str, Any] | None = None
        self._stopping = False

    @property
    def last(self) -> Path:
        return self.dirpath / LAST_CHECKPOINT

    @property
    def state_key(self) -> str:
        return "StageCheckpoint"

    # ---------------------------------------------------------------- saved with the checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"log_step": self._log_step, "rng": rng_state(), "metrics": {}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._log_step = int(state_dict["log_step"])
        set_rng_state(state_dict["rng"])
        self.restored = {str(k): float(v) for k, v in state_dict.get("metrics", {}).items()}
        for logger in self._trainer.loggers if self._trainer is not None else []:
            if isinstance(logger, ResumableLogger):
                logger.resume_at(self._log_step)

    # ---------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            clean_stale_temps(self.dirpath)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reclaim_sigterm()
        if self._agree_to_stop(trainer):  # asked before any step of this session: nothing to save
            raise StopNow

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._write_pending(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_pending(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stopping = False  # training is over: the stage finishes; the runner stops after it
        self._write_pending(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._pending = None  # a failure: the last written checkpoint stays the last good one

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loop = trainer.fit_loop.epoch_loop
        faults.kill_point(f"{self.stage}:batch:{loop.batch_progress.total.processed}")
        if loop.batch_progress.is_last_batch or trainer.fit_loop.done or loop._should_accumulate():
            return  # the epoch end captures it (its hooks must run before the checkpoint)
        if not _between_optimizer_steps(pl_module):
            return
        stop = self._agree_to_stop(trainer)
        n, step = self.every_n_steps, trainer.global_step
        if stop or (n and step % n == 0):
            self._capture(trainer, log_step=loop._batches_that_stepped)
            self._stopping = stop

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        faults.kill_point(f"{self.stage}:epoch:{epoch}")
        stop = self._agree_to_stop(trainer)
        n = self.every_n_epochs
        last = (trainer.max_epochs is not None and 0 <= trainer.max_epochs <= epoch + 1) or (
            trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        )
        if stop or last or (n and (epoch + 1) % n == 0) or self.every_n_steps:
            # epoch-end rows are logged at the step before the increment Lightning has already made
            self._capture(trainer, log_step=trainer.fit_loop.epoch_loop._batches_that_stepped - 1)
            self._stopping = stop

    # ---------------------------------------------------------------- capture, then write
    def _agree_to_stop(self, trainer: pl.Trainer) -> bool:
        stop = stop_requested() is not None
        if trainer.world_size > 1:  # every process stops at the same step
            stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
        return stop

    def _capture(self, trainer: pl.Trainer, log_step: int) -> None:
        self._log_step = log_step
        # a deep copy: the live tensors change with the next step, the file is written after it logs
        self._pending = copy.deepcopy(trainer._checkpoint_connector.dump_checkpoint(weights_only=False))

    def _write_pending(self, trainer: pl.Trainer) -> None:
        if self._pending is not None:
            checkpoint, self._pending = self._pending, None
            for logger in trainer.loggers:
                logger.save()  # the rows up to the checkpoint's step reach the disk first
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
            checkpoint["callbacks"][self.state_key]["metrics"] = metrics
            trainer.strategy.save_checkpoint(checkpoint, str(self.last))
            trainer.strategy.barrier("StageCheckpoint")
            self.written += 1
        if self._stopping:
            raise StopNow


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


# --------------------------------------------------------------------------------------------
# The position rule of the built-in stages
# --------------------------------------------------------------------------------------------

POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")
RELATIVE_POSITION_HINTS = ("rope", "rotary", "alibi")


def learned_positions(model_dir: str | os.PathLike[str]) -> tuple[int, str] | None:
    """``(positions, config key)`` of a model dir with learned absolute position embeddings (GPT-2's
    ``n_positions``, OPT's ``max_position_embeddings``); ``None`` for rotary or ALiBi models (no
    position table to overrun) and for dirs without a readable config.json."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    if any(h in str(k).lower() for k in config for h in RELATIVE_POSITION_HINTS):
        return None
    if config.get("position_embedding_type", "absolute") != "absolute":
        return None
    for key in POSITION_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None


def check_sequence_fits(recipe: Recipe) -> None:
    """The rule for long prompts: ``rollout.max_prompt_tokens`` keeps the last tokens of a longer
    prompt, and a prompt plus the longest response budget (``rollout`` / ``rm`` / ``eval``
    ``max_new_tokens``) plus its end token must fit the positions of every model with learned
    position embeddings: a model dir the recipe names (its config.json) and the base model the
    pipeline builds when ``base.arch`` is ``gpt2`` (``base.max_positions``). So must the packed text
    sequences: an active extra loss's ``seq_len`` (``ptx.seq_len``) and, for the built base model,
    ``pretrain.seq_len``. Rotary models (Llama) have no position table and are not checked. Every
    built-in stage's ``check`` runs it (before anything is built, ``--dry-run`` included)."""
    sections = recipe.sections
    prompt = recipe.section("rollout").max_prompt_tokens
    budgets = [
        (f"{name}.max_new_tokens", recipe.section(name).max_new_tokens) for name in ("rollout", "rm", "eval")
    ]
    # the longest response budget (``eval.max_new_tokens: null`` means the rollout's)
    new_key, new = max(((k, v) for k, v in budgets if v is not None), key=lambda b: b[1])
    limits: list[tuple[str, int, str]] = []
    blocks = [(name, sec) for name, sec in sections.items()]
    blocks += [(c.path, c.config) for c in [*recipe.choices.values(), *recipe.extra_losses]]
    for block, conf in blocks:
        for name in model_path_fields(type(conf)) if conf is not None else ():
            value = getattr(conf, name)
            if isinstance(value, str) and not value.startswith("@"):
                found = learned_positions(value)
                if found is not None:
                    limits.append((f"{block}.{name}", found[0], f"{found[1]} in {value}/config.json"))
    base = recipe.section("base")
    if base.arch == "gpt2" and base.model is None:
        if "pretrain" in planned_stages(recipe):
            limits.append(("base.max_positions", base.max_positions, "the gpt2 model the pipeline builds"))
    # (what needs positions, tokens, key to lower, value that fits) per limit
    seq_lens = [
        (f"{c.path}.seq_len", c.config.seq_len)
        for c in recipe.extra_losses
        if isinstance(getattr(c.config, "seq_len", None), int)  # a packed-text extra loss (``ptx``)
    ]
    for key, positions, where in limits:
        room = positions - new - 1
        needs = [
            (
                f"rollout.max_prompt_tokens + {new_key} = {prompt} + {new} (+1 end token)",
                prompt + new + 1,
                f"lower rollout.max_prompt_tokens to {room}"
                if room >= 1
                else f"lower {new_key} below {positions - 1}",
            )
        ]
        pretrain_len = recipe.section("pretrain").seq_len
        extra = [*seq_lens, *([("pretrain.seq_len", pretrain_len)] if key == "base.max_positions" else [])]
        needs += [(f"{k} = {v}", v, f"lower {k} to {positions}") for k, v in extra if isinstance(v, int)]
        for what, tokens, fix in needs:
            if tokens > positions:
                raise ConfigError(f"{what} does not fit the {positions} positions of {key} ({where}); {fix}")


# --------------------------------------------------------------------------------------------
# Numerical guards: flags gathered without host syncs, read once (the RL stage's guard)
# --------------------------------------------------------------------------------------------


def finite_flags(named: Mapping[str, Tensor | None]) -> dict[str, Tensor]:
    """``{name: isfinite(x).all()}`` for the tensors that are not ``None``: 0-dim bool tensors on
    their device, no host sync (:func:`first_non_finite` reads them)."""
    return {k: torch.isfinite(v.detach()).all() for k, v in named.items() if v is not None}


def and_finite(flags: dict[str, Tensor], name: str, x: Tensor) -> Tensor:
    """AND ``isfinite(x).all()`` into ``flags[name]`` (no host sync); returns ``x`` unchanged."""
    ok = torch.isfinite(x.detach()).all()
    flags[name] = flags[name].to(ok.device) & ok if name in flags else ok
    return x


def first_non_finite(flags: Mapping[str, Tensor]) -> str | None:
    """The first name (in insertion order) whose flag is false on **any** process, or ``None``.

    One all-reduce and one host sync, so every process stops at the same place (a process raising
    alone would leave the others waiting in the next collective). Every process must pass the same
    names in the same order."""
    if not flags:
        return None
    names = list(flags)
    device = flags[names[0]].device
    bad = all_reduce_sum(torch.stack([~flags[n].to(device).reshape(()) for n in names]).float())
    return next((n for n, b in zip(names, bad.tolist()) if b > 0), None)
