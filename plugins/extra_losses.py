"""Extra losses added to every policy update. ``ptx``: InstructGPT's PPO-ptx pretraining mix.

Ouyang et al. (2022), eq. 2: ``objective(φ) = E[r − β log(π/π_SFT)] + γ E_{x∼D_pretrain}[log π(x)]``.
We add ``γ · L_ptx`` to the loss of every optimiser step, where ``L_ptx`` is the mean next-token
cross-entropy **per token** (nats/token) over a batch of ``batch_size`` packed sequences of
``seq_len`` tokens of the task's pretraining text, drawn fresh for every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from instructrl.core.fields import param
from instructrl.core.errors import DataError
from instructrl.core.hookspecs import hookimpl
from instructrl.core.registry import BuildContext
from instructrl.core.types import LossOutput, scalar


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


def pack_tokens(tokenizer: Any, docs: list[str], seq_len: int) -> torch.Tensor:
    """``(N, seq_len)`` chunks of the documents tokenized as ``BOS … EOS`` and concatenated."""
    stream: list[int] = []
    for d in docs:
        stream += tokenizer(d, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


class PtxLoss:
    """``γ · LM loss`` on a fresh batch of pretraining text each step."""

    def __init__(self, config: PtxConfig, data: torch.Tensor, seed: int, rank: int) -> None:
        self.coef = config.coef
        self.config = config
        self.data = data
        self.seed = seed
        self.rank = rank

    def batch(self, step: int) -> torch.Tensor:
        """``(batch_size, seq_len)`` rows for optimiser step ``step`` (deterministic, per process)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 7919 + self.rank)
        idx = torch.randint(0, self.data.shape[0], (self.config.batch_size,), generator=gen)
        return self.data[idx]

    def __call__(self, policy: Any, step: int) -> LossOutput:
        ids = self.batch(step).to(next(policy.model.parameters()).device)
        loss = policy.lm_loss(ids, torch.ones_like(ids))
        return LossOutput(self.coef * loss, {"loss": scalar(loss)})


def make_ptx(config: PtxConfig, ctx: BuildContext) -> PtxLoss:
    """PPO-ptx: γ × per-token LM loss on the task's pretraining text (InstructGPT eq. 2)."""
    if ctx.task is None or ctx.tokenizer is None:
        raise DataError("ptx: needs the task's pretraining text and the policy tokenizer")
    docs = list(ctx.task.pretraining_text("train"))
    if not docs:
        raise DataError(
            "ptx: the task has no pretraining text (task.pretraining_text('train') is empty); set ptx.coef=0"
        )
    data = pack_tokens(ctx.tokenizer, docs, config.seq_len)
    if data.shape[0] == 0:
        raise DataError(f"ptx: the pretraining text is shorter than one sequence of {config.seq_len} tokens")
    rank = (
        torch.distributed.get_rank()
        if torch.distributed.is_available() and torch.distributed.is_initialized()
        else 0
    )
    return PtxLoss(config, data, ctx.seed, rank)


@hookimpl
def register_extra_losses(register: Any) -> None:
    register("ptx", make_ptx, config=PtxConfig)
