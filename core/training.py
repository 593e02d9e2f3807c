"""What every stage shares: the stage context, the Lightning Trainer factory (atomic checkpoint
writes, the recipe's precision), stopping on SIGINT / SIGTERM at a safe point, resumable
checkpoints and data order, seeding, the learning-rate schedule, and the one sequence layout —
tokenizing prompts, responses and documents, sampling and scoring in chunks."""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from . import faults
from .config import Recipe
from .errors import DataError
from .fields import field_for_role
from .io import atomic_file, clean_stale_temps
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
        sampler = getattr(loader, "batch_sampler", None)
        if isinstance(sampler, EpochBatchSampler):
            sampler.trainer = trainer
    for logger in trainer.loggers:
        if ckpt_path is not None and isinstance(getattr(type(logger), "resuming", None), bool):
            logger.resuming = True  # type: ignore[attr-defined]  # keep metrics.csv's rows
    try:
        trainer.fit(*args, ckpt_path=ckpt_path, **kwargs)
    except _StopNow:
        raise Interrupted(stop_requested() or signal.SIGINT) from None
    if trainer.interrupted:
        raise Interrupted(stop_requested() or signal.SIGINT)
    ckpt = next((c for c in trainer.callbacks if isinstance(c, StageCheckpoint)), None)
    metrics = dict(ckpt.restored) if ckpt is not None else {}
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    return metrics


# --------------------------------------------------------------------------------------------
# Stopping on a signal, atomic checkpoints
# --------------------------------------------------------------------------------------------

CHECKPOINT_SUBDIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
CHECKPOINTS_PER_STAGE = 10
"""An upstream stage (pretrain, SFT, RM) checkpoints every epoch and about this many times in all."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT (exit 130) or SIGTERM (exit 143): at the next safe point with a
    checkpoint, or ``at_once`` on a second signal."""

    def __init__(self, signum: int, at_once: bool = False) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.at_once = at_once

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _StopNow(BaseException):
    """Raised by :class:`StageCheckpoint` after the checkpoint of a requested stop is written; not
    an ``Exception`` so nothing in between swallows it (:func:`fit` turns it into Interrupted)."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested: int | None = None
_installed = False


def stop_requested() -> int | None:
    """The signal asking the run to stop at the next safe point, or ``None``."""
    return _requested


def _on_stop_signal(signum: int, frame: object) -> None:
    global _requested
    if _requested is None:  # the first: stop at the next safe point
        _requested = signum
        return
    raise Interrupted(signum, at_once=True)  # the second: stop now


def install_stop_handlers() -> Callable[[], None]:
    """Handle SIGINT and SIGTERM: the first asks for a stop at the next safe point (the end of an
    optimiser step, or between stages), the second stops at once. Returns the function that puts
    the previous handlers back (a no-op outside the main thread)."""
    global _installed, _requested
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, _on_stop_signal)
    _installed, _requested = True, None

    def restore() -> None:
        global _installed, _requested
        for s, handler in previous.items():
            signal.signal(s, handler)
        _installed, _requested = False, None

    return restore


def check_stop() -> None:
    """Raise :class:`Interrupted` if a stop was requested (between stages)."""
    if _requested is not None:
        raise Interrupted(_requested)


def _reclaim_sigterm() -> None:
    """Lightning installs its own SIGTERM handler when training starts; while ours are installed,
    take SIGTERM back so both signals stop at the same safe point."""
    if _installed and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_stop_signal)


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
    """No gradient is waiting for an optimiser step (a checkpoint here is resumable exactly): the
    module's own ``resumable_now()`` if it has one; under manual optimisation (RL, where several
    micro-batches may make one step), every gradient is ``None`` (the optimisers zero them with
    ``set_to_none`` after stepping); Lightning's accumulation is checked by the caller."""
    resumable = getattr(pl_module, "resumable_now", None)
    if resumable is not None:
        return bool(resumable())
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
            if hasattr(logger, "resume_at"):
                logger.resume_at(self._log_step)

    # ---------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            clean_stale_temps(self.dirpath)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _reclaim_sigterm()
        if self._agree_to_stop(trainer):  # asked before any step of this session: nothing to save
            raise _StopNow

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
            raise _StopNow


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
