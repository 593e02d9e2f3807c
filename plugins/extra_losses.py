"""Extra losses added to every policy update. ``ptx``: InstructGPT's PPO-ptx pretraining mix.

Ouyang et al. (2022), eq. 2: ``objective(φ) = E[r − β log(π/π_SFT)] + γ E_{x∼D_pretrain}[log π(x)]``.
We add ``γ · L_ptx`` to the loss of every optimiser step, where ``L_ptx`` is the mean next-token
cross-entropy **per token** (nats/token) over a batch of ``batch_size`` packed sequences of
``seq_len`` tokens of the task's pretraining text, drawn fresh for every step. Under gradient
accumulation the batch is split over the step's micro-batches, each weighted by its share of rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from instructrl.core.errors import DataError
from instructrl.core.fields import param
from instructrl.core.hookspecs import Register, hookimpl
from instructrl.core.registry import BuildContext
from instructrl.core.types import ExtraLossInput, LossOutput, Needs, scalar
from instructrl.plugins.stages.common import pack_docs
from torch import Tensor


@dataclass
class PtxConfig:
    coef: float = param(
        27.8, "γ, the weight of the pretraining loss (InstructGPT: 27.8); 0 switches ptx off."
    )
    batch_size: int = param(8, "Packed pretraining sequences per optimiser step (per process).")
    seq_len: int = param(64, "Tokens per pretraining sequence.")

    def __post_init__(self) -> None:
        if self.coef < 0:
            raise ValueError(f"coef must be >= 0 (got {self.coef})")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {self.batch_size})")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (got {self.seq_len})")


class PtxLoss:
    """``γ · LM loss`` on a fresh batch of pretraining text each optimiser step, split over the
    step's micro-batches so the accumulated gradient is the whole batch's (stateful: its random
    generator is checkpointed)."""

    def __init__(self, config: PtxConfig, data: Tensor, seed: int, rank: int) -> None:
        self.coef = config.coef
        self.config = config
        self.data = data
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        self.rows: Tensor | None = None

    def batch(self) -> Tensor:
        """``(batch_size, seq_len)`` rows for the next optimiser step (advances the generator)."""
        idx = torch.randint(0, self.data.shape[0], (self.config.batch_size,), generator=self.generator)
        return self.data[idx]

    def __call__(self, inp: ExtraLossInput) -> LossOutput:
        if inp.micro_index == 0 or self.rows is None:
            self.rows = self.batch()
        chunk = torch.tensor_split(self.rows, inp.micro_count)[inp.micro_index]
        if chunk.shape[0] == 0:  # more micro-batches than ptx rows: this one carries none
            zero = next(inp.policy.model.parameters()).sum() * 0.0
            return LossOutput(zero, {})
        ids = chunk.to(next(inp.policy.model.parameters()).device)
        loss = inp.policy.lm_loss(ids, torch.ones_like(ids))
        weight = chunk.shape[0] / self.config.batch_size  # every row has seq_len real tokens
        return LossOutput(self.coef * weight * loss, {"loss": scalar(loss)})

    def state_dict(self) -> dict[str, object]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.generator.set_state(state["generator"])  # type: ignore[arg-type]
        self.rows = None


def make_ptx(config: PtxConfig, ctx: BuildContext) -> PtxLoss:
    """PPO-ptx: γ × per-token LM loss on the task's pretraining text (InstructGPT eq. 2)."""
    if ctx.task is None or ctx.tokenizer is None:
        raise DataError("ptx: needs the task's pretraining text and the policy tokenizer")
    docs = list(ctx.task.pretraining_text("train"))
    if not docs:
        raise DataError(
            "task.pretraining: ptx needs pretraining text and the task has none; set "
            "task.pretraining=path/to/text.txt (jsonl task), choose a task that has text (task.name), "
            "or switch ptx off with ptx.coef=0"
        )
    data = pack_docs(ctx.tokenizer, docs, config.seq_len, "ptx: the pretraining text")
    rank = (
        torch.distributed.get_rank()
        if torch.distributed.is_available() and torch.distributed.is_initialized()
        else 0
    )
    return PtxLoss(config, data, ctx.seed, rank)


@hookimpl
def register_extra_losses(register: Register) -> None:
    register("ptx", make_ptx, config=PtxConfig, needs=Needs(stateful=True))
