"""Language-model stages: **pretrain** (the tiny base LM on the task's corpus; stands in for GPT-3)
and **sft** (supervised fine-tuning on the labeler demonstrations, loss on the response)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import lightning.pytorch as pl
import torch
from instructrl.core.config import Recipe
from instructrl.core.errors import DataError
from instructrl.core.fields import non_negative, param, positive, unit_interval
from instructrl.core.hookspecs import hookimpl
from instructrl.core.io import is_global_zero, write_json
from instructrl.core.models import (
    build_causal_lm,
    count_parameters,
    load_causal_lm,
    load_tokenizer,
    save_model_dir,
    set_dropout,
    train_tokenizer,
)
from instructrl.core.ops import logprobs_from_logits
from instructrl.core.training import (
    StageContext,
    cache_blocks,
    devices,
    eval_loader,
    fit,
    lr_lambda,
    make_trainer,
    pack_docs,
    pad_right,
    resumable_loader,
    resume_path,
    seed_everything,
    stage_checkpoint,
    tokenize_docs,
)
from instructrl.core.types import position_ids_from_mask
from torch import Tensor
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
    from transformers import PreTrainedTokenizerBase


@dataclass
class BaseSection:
    """``base``: the base language model (stands in for GPT-3)."""

    model: str | None = param(
        None, "An existing HF causal-LM dir; when set the pretrain stage is skipped.", model_path="input"
    )
    arch: Literal["llama", "gpt2"] = param(
        "llama", "Architecture of the tiny base model built from a config."
    )
    hidden_size: int = param(128, "Width of the tiny base model.")
    layers: int = param(4, "Transformer blocks.")
    heads: int = param(4, "Attention heads (must divide hidden_size).")
    intermediate_size: int | None = param(
        None, "MLP width; null means 4 × hidden_size (gpt2) or 8/3 × (llama)."
    )
    max_positions: int = param(256, "Longest sequence the model accepts.")
    tokenizer: Literal["char", "bpe"] = param(
        "char", "Tokenizer trained on the task's text: one token per character, or byte-level BPE."
    )
    vocab_size: int = param(512, "BPE vocabulary size (tokenizer=bpe only).")
    trust_remote_code: bool = param(False, "Allow model code from the model dir (only for models you trust).")

    def __post_init__(self) -> None:
        for name in ("hidden_size", "layers", "heads", "max_positions", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.hidden_size % self.heads:
            raise ValueError(
                f"heads must divide hidden_size (got heads={self.heads}, hidden_size={self.hidden_size})"
            )


@dataclass
class PretrainSection:
    """``pretrain``: the tiny base LM trained on the task's pretraining corpus."""

    seed: int = param(0, "Seed of the pretrain stage.")
    steps: int = param(3000, "Optimiser steps.")
    batch_size: int = param(32, "Sequences per step (per process).")
    seq_len: int = param(128, "Tokens per training sequence (texts are packed).")
    lr: float = param(2e-3, "Peak learning rate (AdamW), cosine decay after warmup.")
    warmup_steps: int = param(100, "Linear warmup steps.")
    weight_decay: float = param(0.1, "AdamW weight decay.")

    def __post_init__(self) -> None:
        positive(self, "steps", "batch_size", "seq_len", "lr")
        non_negative(self, "warmup_steps", "weight_decay")
        if self.seq_len < 2:
            raise ValueError(
                f"seq_len must be >= 2: a sequence needs a token to predict (got {self.seq_len})"
            )


@dataclass
class SFTSection:
    """``sft``: supervised fine-tuning on the labeler demonstrations."""

    seed: int = param(0, "Seed of the SFT stage.")
    model: str = param(
        "@pretrain", "Model to fine-tune: '@pretrain' or an HF causal-LM dir.", model_path="input"
    )
    epochs: int = param(16, "Epochs over the demonstrations (paper: 16).")
    batch_size: int = param(32, "Demonstrations per step (per process).")
    lr: float = param(1e-3, "Peak learning rate (AdamW).")
    schedule: Literal["cosine", "constant"] = param(
        "cosine", "Learning-rate schedule after warmup (paper: cosine)."
    )
    warmup_ratio: float = param(0.05, "Fraction of steps spent in linear warmup.")
    weight_decay: float = param(0.0, "AdamW weight decay.")
    dropout: float = param(0.0, "Residual/attention dropout during SFT (paper: 0.2 at 175B scale).")
    response_only: bool = param(True, "Loss on response tokens only (prompt tokens masked).")
    val_fraction: float = param(0.05, "Fraction of demonstrations held out for the validation loss.")

    def __post_init__(self) -> None:
        positive(self, "epochs", "batch_size", "lr")
        non_negative(self, "weight_decay")
        unit_interval(self, "warmup_ratio", "dropout", "val_fraction")


class CausalLMModule(pl.LightningModule):
    """Next-token loss on the tokens where ``loss_mask`` is 1 (all real tokens, or the response).

    Batches are dicts of ``input_ids (B, T)``, ``attention_mask (B, T)``, ``loss_mask (B, T)``
    (1 where token ``t`` is a target).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        lr: float,
        weight_decay: float,
        total_steps: int,
        warmup_steps: int,
        schedule: str,
        prefix: str,
    ) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay = lr, weight_decay
        self.total_steps, self.warmup_steps, self.schedule = total_steps, warmup_steps, schedule
        self.prefix = prefix

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Mean next-token cross-entropy over target tokens, and the number of targets."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
        ).logits
        target = batch["loss_mask"][:, 1:].float()
        logp = logprobs_from_logits(logits[:, :-1], ids[:, 1:])
        n = target.sum()
        return -(logp * target).sum() / n.clamp_min(1.0), n

    def on_fit_start(self) -> None:
        self.model.train()  # HF loads in eval mode; SFT dropout (sft.dropout) needs train mode

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, _ = self.loss(batch)
        self.log(f"{self.prefix}/loss", loss, prog_bar=True)
        self.log(f"{self.prefix}/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, n = self.loss(batch)
        self.log(
            f"{self.prefix}/val_loss", loss, prog_bar=True, sync_dist=True, batch_size=int(n.item()) or 1
        )

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            betas=(0.9, 0.95),
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(self.total_steps, self.warmup_steps, self.schedule)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class PackedText(Dataset):
    """Documents tokenized (BOS … EOS), concatenated and cut into ``(seq_len,)`` chunks."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, docs: Sequence[str], seq_len: int) -> None:
        self.data = pack_docs(tokenizer, docs, seq_len, "pretraining text")

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        x = self.data[i]
        ones = torch.ones_like(x)
        return {"input_ids": x, "attention_mask": ones, "loss_mask": ones}


class Demos(Dataset):
    """SFT examples: BOS + prompt + response + EOS; the loss mask covers the response (and EOS)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        pairs: Sequence[tuple[str, str]],
        max_len: int,
        response_only: bool,
    ) -> None:
        self.rows: list[tuple[list[int], int]] = []
        for prompt, response in pairs:
            p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = (p + r)[-max_len:]
            start = max(1, len(ids) - len(r)) if response_only else 1
            self.rows.append((ids, start))
        self.pad_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.rows[i]

    def collate(self, items: Sequence[tuple[list[int], int]]) -> dict[str, Tensor]:
        ids, mask = pad_right([r for r, _ in items], self.pad_id)
        loss_mask = mask.clone()
        for i, (_, start) in enumerate(items):
            loss_mask[i, :start] = 0
        return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


def collate_docs(pad_id: int) -> Callable[[Sequence[list[int]]], dict[str, Tensor]]:
    """Right-pad documents into a batch whose loss covers every real token."""

    def collate(items: Sequence[list[int]]) -> dict[str, Tensor]:
        ids, mask = pad_right(items, pad_id)
        return {"input_ids": ids, "attention_mask": mask, "loss_mask": mask}

    return collate


# ============================================================================================
# pretrain
# ============================================================================================


class PretrainStage:
    """Train the tiny base LM (and its tokenizer) on the task's pretraining corpus."""

    sections = {"base": BaseSection, "pretrain": PretrainSection}

    def inputs(self, recipe: Recipe) -> dict[str, object]:
        return {}

    def cache_key(self, recipe: Recipe) -> dict[str, object]:
        return cache_blocks(recipe, "task", "base", "pretrain", "trainer")

    def skip(self, recipe: Recipe) -> tuple[str, str] | None:
        model = recipe.section("base").model
        return (f"base.model is set: {model}", str(model)) if model else None

    def check(self, recipe: Recipe) -> None:
        """Nothing beyond the sections' own checks."""

    def describe(self, recipe: Recipe) -> dict[str, object]:
        base, pre = recipe.section("base"), recipe.section("pretrain")
        if base.model:
            return {"skipped": f"base.model is set: {base.model}"}
        n = devices(recipe)
        return {
            "model": f"{base.arch} hidden={base.hidden_size} layers={base.layers} heads={base.heads}",
            "tokenizer": base.tokenizer,
            "steps": pre.steps,
            "tokens_per_step": pre.batch_size * pre.seq_len * n,
            "total_tokens": pre.steps * pre.batch_size * pre.seq_len * n,
        }

    def run(self, ctx: StageContext) -> dict[str, object]:
        recipe = ctx.recipe
        base, cfg = recipe.section("base"), recipe.section("pretrain")
        seed_everything(cfg.seed)
        task = ctx.build_task()
        docs = list(task.pretraining_text("train"))
        eval_docs = list(task.pretraining_text("eval"))
        if not docs:
            raise DataError(
                "task: the pretrain stage needs pretraining text (task.pretraining_text('train') is empty)"
            )
        # The tokenizer sees the corpus and the instruction data so every symbol has a token.
        extra = [d.prompt.text + d.response for d in task.demonstrations()] + [
            p.text for p in task.prompts("rl")
        ]
        tokenizer = train_tokenizer(docs + extra, base.tokenizer, base.vocab_size)
        model = build_causal_lm(base, tokenizer)
        model.config._attn_implementation = "eager"  # fastest at this size on CPU (benchmarks/)
        train = PackedText(tokenizer, docs, cfg.seq_len)
        val_rows = tokenize_docs(tokenizer, eval_docs[:256], cfg.seq_len)
        module = CausalLMModule(
            model,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            total_steps=cfg.steps,
            warmup_steps=cfg.warmup_steps,
            schedule="cosine",
            prefix="pretrain",
        )
        # data order: a seeded permutation per epoch, resumable mid-epoch (core.training.EpochBatchSampler)
        loader = resumable_loader(train, cfg.batch_size, seed=cfg.seed, shuffle=True, drop_last=True)
        val = eval_loader(val_rows, 64, collate_fn=collate_docs(tokenizer.pad_token_id)) if val_rows else None
        val_every = max(1, min(cfg.steps, 500))
        trainer = make_trainer(
            ctx,
            checkpoint=stage_checkpoint(ctx, cfg.steps),
            max_steps=cfg.steps,
            max_epochs=-1,
            val_check_interval=val_every,
            check_val_every_n_epoch=None,
            use_distributed_sampler=False,
        )
        metrics = fit(trainer, module, loader, val, ckpt_path=resume_path(ctx))
        if is_global_zero():
            save_model_dir(model, tokenizer, ctx.model_dir)
        trainer.strategy.barrier()
        summary = {
            "pretrain/params": count_parameters(model),
            "pretrain/vocab_size": len(tokenizer),
            "pretrain/loss": metrics.get("pretrain/loss", float("nan")),
            "pretrain/val_loss": metrics.get("pretrain/val_loss", float("nan")),
        }
        write_json(ctx.stage_dir / "summary.json", summary)
        return summary


# ============================================================================================
# sft
# ============================================================================================


class SFTStage:
    """Fine-tune on the labeler demonstrations (loss on the response tokens by default)."""

    sections = {"sft": SFTSection}

    def inputs(self, recipe: Recipe) -> dict[str, object]:
        return {"sft.model": recipe.section("sft").model}

    def cache_key(self, recipe: Recipe) -> dict[str, object]:
        return cache_blocks(recipe, "task", "sft", "trainer")

    def skip(self, recipe: Recipe) -> tuple[str, str] | None:
        return None

    def check(self, recipe: Recipe) -> None:
        """Nothing beyond the section's own checks."""

    def describe(self, recipe: Recipe) -> dict[str, object]:
        cfg = recipe.section("sft")
        return {
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size * devices(recipe),
            "lr": cfg.lr,
            "schedule": cfg.schedule,
            "loss": "response tokens" if cfg.response_only else "all tokens",
        }

    def run(self, ctx: StageContext) -> dict[str, object]:
        recipe = ctx.recipe
        cfg = recipe.section("sft")
        seed_everything(cfg.seed)
        src = ctx.resolve(cfg.model, "sft.model")
        tokenizer = load_tokenizer(src, "sft.model")
        model = load_causal_lm(src, "sft.model", tokenizer=tokenizer, dropout=cfg.dropout)
        task = ctx.build_task()
        demos = list(task.demonstrations())
        if len(demos) < 2:
            raise DataError(f"task: the sft stage needs demonstrations (got {len(demos)})")
        pairs = [(d.prompt.text, d.response) for d in demos]
        random.Random(cfg.seed).shuffle(pairs)
        n_val = int(round(len(pairs) * cfg.val_fraction))
        max_len = (
            int(model.config.max_position_embeddings)
            if hasattr(model.config, "max_position_embeddings")
            else 1024
        )
        train = Demos(tokenizer, pairs[n_val:], max_len, cfg.response_only)
        val = Demos(tokenizer, pairs[:n_val], max_len, cfg.response_only) if n_val else None
        steps_per_epoch = max(1, len(train) // (cfg.batch_size * devices(recipe)))
        total = steps_per_epoch * cfg.epochs
        module = CausalLMModule(
            model,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            total_steps=total,
            warmup_steps=int(cfg.warmup_ratio * total),
            schedule=cfg.schedule,
            prefix="sft",
        )
        # data order: a seeded permutation per epoch, resumable mid-epoch (core.training.EpochBatchSampler)
        loader = resumable_loader(
            train,
            cfg.batch_size,
            seed=cfg.seed,
            collate_fn=train.collate,
            drop_last=len(train) > cfg.batch_size,
        )
        vloader = eval_loader(val, 64, collate_fn=val.collate) if val else None
        trainer = make_trainer(
            ctx, checkpoint=stage_checkpoint(ctx, total), max_epochs=cfg.epochs, use_distributed_sampler=False
        )
        metrics = fit(trainer, module, loader, vloader, ckpt_path=resume_path(ctx))
        set_dropout(model, 0.0)
        if is_global_zero():
            save_model_dir(model, tokenizer, ctx.model_dir)
        trainer.strategy.barrier()
        summary = {
            "sft/loss": metrics.get("sft/loss", float("nan")),
            "sft/val_loss": metrics.get("sft/val_loss", float("nan")),
            "sft/n_demos": len(demos),
            "sft/steps": total,
        }
        write_json(ctx.stage_dir / "summary.json", summary)
        return summary


@hookimpl
def register_stages(register: Callable[..., None]) -> None:
    register("pretrain", PretrainStage())
    register("sft", SFTStage())
