"""Language-model stages: **pretrain** (the tiny base LM on the task's corpus; stands in for GPT-3),
**sft** (supervised fine-tuning on the labeler demonstrations, loss on the response) and
**rl_init** (the paper's RL initialisation: the same fine-tuning with a share of pretraining
sequences in every batch; Ouyang et al. 2022, appendix C)."""

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
from instructrl.core.ops import logprobs_from_logits
from instructrl.core.training import StageContext, devices
from instructrl.core.types import position_ids_from_mask
from instructrl.plugins.models import (
    build_causal_lm,
    count_parameters,
    load_causal_lm,
    load_tokenizer,
    save_model_dir,
    set_dropout,
    train_tokenizer,
)
from instructrl.plugins.stages.common import (
    cache_blocks,
    check_sequence_fits,
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
    batch_size: int = param(
        32,
        "Sequences per step (per process): demonstrations, plus the pretrain_mix share of pretraining text.",
    )
    lr: float = param(1e-3, "Peak learning rate (AdamW).")
    schedule: Literal["cosine", "constant"] = param(
        "cosine", "Learning-rate schedule after warmup (paper: cosine)."
    )
    warmup_ratio: float = param(0.05, "Fraction of steps spent in linear warmup.")
    weight_decay: float = param(0.0, "AdamW weight decay.")
    dropout: float = param(0.0, "Residual/attention dropout during SFT (paper: 0.2 at 175B scale).")
    response_only: bool = param(True, "Loss on response tokens only (prompt tokens masked).")
    val_fraction: float = param(0.05, "Fraction of demonstrations held out for the validation loss.")
    min_lr_ratio: float = param(0.1, "The cosine schedule ends at this fraction of the peak LR (paper: 0.1).")
    pretrain_mix: float = param(
        0.0,
        "Fraction of each batch's sequences that are pretraining text (the base model's corpus, loss on "
        "every token; the rest are demonstrations). 0 = plain SFT; the RL init uses 0.1 (paper).",
    )
    text_seq_len: int = param(128, "Tokens per pretraining sequence in the mix (texts are packed).")

    def __post_init__(self) -> None:
        positive(self, "epochs", "batch_size", "lr", "text_seq_len")
        non_negative(self, "weight_decay")
        unit_interval(self, "warmup_ratio", "dropout", "val_fraction", "min_lr_ratio")
        if not 0.0 <= self.pretrain_mix < 1.0:
            raise ValueError(f"pretrain_mix must be in [0, 1) (got {self.pretrain_mix})")
        if self.pretrain_mix and text_rows(self.batch_size, self.pretrain_mix) == 0:
            raise ValueError(
                f"pretrain_mix: {self.pretrain_mix} of batch_size {self.batch_size} rounds to no pretraining "
                f"sequence; raise pretrain_mix to >= {0.5 / self.batch_size:.3g} or batch_size"
            )


@dataclass
class RLInitSection(SFTSection):
    """``rl_init``: the RL initialisation (Ouyang et al. 2022, appendix C): the pretrained model
    fine-tuned on the demonstrations with 10% pretraining sequences per batch, 2 epochs, cosine to
    10% of the peak LR. The PPO policy (``policy.model: "@rl_init"``) starts here; win rates stay
    against the plain SFT model (``eval.against: "@sft"``)."""

    seed: int = param(0, "Seed of the RL-init stage.")
    model: str = param(
        "@pretrain",
        "Model to fine-tune: '@pretrain' (paper), '@sft' or an HF causal-LM dir.",
        model_path="input",
    )
    epochs: int = param(2, "Epochs over the demonstrations (paper: 2).")
    pretrain_mix: float = param(
        0.1, "Fraction of each batch's sequences that are pretraining text (paper: 0.1)."
    )


def text_rows(batch_size: int, mix: float) -> int:
    """Pretraining sequences in a batch of ``batch_size`` rows at mix fraction ``mix`` (rounded; at
    least one demonstration stays)."""
    return min(batch_size - 1, int(round(batch_size * mix)))


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
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay = lr, weight_decay
        self.total_steps, self.warmup_steps, self.schedule = total_steps, warmup_steps, schedule
        self.prefix = prefix
        self.min_lr_ratio = min_lr_ratio

    def token_losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(nll (B, T−1), target (B, T−1))``: per-token next-token loss and the 0/1 target mask."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
        ).logits
        target = batch["loss_mask"][:, 1:].float()
        return -logprobs_from_logits(logits[:, :-1], ids[:, 1:]) * target, target

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Mean next-token cross-entropy over target tokens, and the number of targets."""
        nll, target = self.token_losses(batch)
        n = target.sum()
        return nll.sum() / n.clamp_min(1.0), n

    def on_fit_start(self) -> None:
        self.model.train()  # HF loads in eval mode; SFT dropout (sft.dropout) needs train mode

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        nll, target = self.token_losses(batch)
        loss = nll.sum() / target.sum().clamp_min(1.0)  # one token mean over both parts of a mix
        self.log(f"{self.prefix}/loss", loss, prog_bar=True)
        if "is_text" in batch:  # a pretraining mix: each part's token-mean loss beside the total
            for part, rows in (("demo", ~batch["is_text"]), ("text", batch["is_text"])):
                part_loss = nll[rows].sum() / target[rows].sum().clamp_min(1.0)
                self.log(f"{self.prefix}/loss_{part}", part_loss.detach())
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
            opt, lr_lambda(self.total_steps, self.warmup_steps, self.schedule, self.min_lr_ratio)
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


class MixedDemos(Dataset):
    """Demonstrations with ``per_batch`` packed pretraining sequences appended to every batch (loss on
    every text token). Which text rows join a batch is a function of ``seed`` and the batch's
    demonstration indices alone, so a resumed run draws the same ones. ``is_text (B,)`` marks them."""

    def __init__(self, demos: Demos, text: Tensor, per_batch: int, seed: int) -> None:
        self.demos, self.text, self.per_batch, self.seed = demos, text, per_batch, seed

    def __len__(self) -> int:
        return len(self.demos)

    def __getitem__(self, i: int) -> tuple[list[int], int, int]:
        ids, start = self.demos[i]
        return ids, start, i

    def collate(self, items: Sequence[tuple[list[int], int, int]]) -> dict[str, Tensor]:
        rng = random.Random(f"{self.seed}:{','.join(str(i) for *_, i in items)}")
        picks = [rng.randrange(self.text.shape[0]) for _ in range(self.per_batch)]
        rows = [(ids, start) for ids, start, _ in items] + [(self.text[j].tolist(), 1) for j in picks]
        batch = self.demos.collate(rows)
        batch["is_text"] = torch.tensor([False] * len(items) + [True] * len(picks))
        return batch


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
        """The position rule (:func:`check_sequence_fits`)."""
        check_sequence_fits(recipe)

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
        # data order: a seeded permutation per epoch, resumable mid-epoch (plugins.stages.common.EpochBatchSampler)
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
    """Fine-tune on the labeler demonstrations (loss on the response tokens by default), with an
    optional share of pretraining sequences per batch (``pretrain_mix``). Registered twice: as
    ``sft`` and as ``rl_init`` (the paper's RL initialisation: its own section and cache key)."""

    def __init__(self, name: str, section: type[SFTSection]) -> None:
        self.name = name
        self.sections = {name: section}

    def inputs(self, recipe: Recipe) -> dict[str, object]:
        return {f"{self.name}.model": recipe.section(self.name).model}

    def cache_key(self, recipe: Recipe) -> dict[str, object]:
        return cache_blocks(recipe, "task", self.name, "trainer")

    def skip(self, recipe: Recipe) -> tuple[str, str] | None:
        return None

    def check(self, recipe: Recipe) -> None:
        """Nothing beyond the section's own checks: demonstrations are cut to the model's positions
        and the mix's text rows to ``min(text_seq_len, positions)``."""

    def describe(self, recipe: Recipe) -> dict[str, object]:
        cfg = recipe.section(self.name)
        n_text = text_rows(cfg.batch_size, cfg.pretrain_mix) if cfg.pretrain_mix else 0
        return {
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size * devices(recipe),
            "lr": cfg.lr,
            "schedule": cfg.schedule
            + (f" to {cfg.min_lr_ratio:g} of the peak" if cfg.schedule == "cosine" else ""),
            "loss": "response tokens" if cfg.response_only else "all tokens",
            "pretraining_sequences_per_batch": f"{n_text} of {cfg.batch_size} ({cfg.text_seq_len} tokens each)",
        }

    def run(self, ctx: StageContext) -> dict[str, object]:
        recipe, name = ctx.recipe, self.name
        cfg = recipe.section(name)
        seed_everything(cfg.seed)
        src = ctx.resolve(cfg.model, f"{name}.model")
        tokenizer = load_tokenizer(src, f"{name}.model")
        model = load_causal_lm(src, f"{name}.model", tokenizer=tokenizer, dropout=cfg.dropout)
        task = ctx.build_task()
        demos = list(task.demonstrations())
        if len(demos) < 2:
            raise DataError(f"task: the {name} stage needs demonstrations (got {len(demos)})")
        pairs = [(d.prompt.text, d.response) for d in demos]
        random.Random(cfg.seed).shuffle(pairs)
        n_val = int(round(len(pairs) * cfg.val_fraction))
        max_len = int(getattr(model.config, "max_position_embeddings", 1024))
        train: Demos | MixedDemos = Demos(tokenizer, pairs[n_val:], max_len, cfg.response_only)
        val = Demos(tokenizer, pairs[:n_val], max_len, cfg.response_only) if n_val else None
        n_text = text_rows(cfg.batch_size, cfg.pretrain_mix) if cfg.pretrain_mix else 0
        if n_text:
            docs = list(task.pretraining_text("train"))  # the base model's corpus, never instruction data
            if not docs:
                raise DataError(
                    f"task: {name}.pretrain_mix needs pretraining text (task.pretraining_text('train') is empty)"
                )
            text = pack_docs(tokenizer, docs, min(cfg.text_seq_len, max_len), "pretraining text")
            train = MixedDemos(train, text, n_text, cfg.seed)
        demos_per_batch = cfg.batch_size - n_text
        steps_per_epoch = max(1, len(train) // (demos_per_batch * devices(recipe)))
        total = steps_per_epoch * cfg.epochs
        module = CausalLMModule(
            model,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            total_steps=total,
            warmup_steps=int(cfg.warmup_ratio * total),
            schedule=cfg.schedule,
            min_lr_ratio=cfg.min_lr_ratio,
            prefix=name,
        )
        # data order: a seeded permutation per epoch, resumable mid-epoch (plugins.stages.common.EpochBatchSampler)
        loader = resumable_loader(
            train,
            demos_per_batch,
            seed=cfg.seed,
            collate_fn=train.collate,
            drop_last=len(train) > demos_per_batch,
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
        summary: dict[str, object] = {
            f"{name}/loss": metrics.get(f"{name}/loss", float("nan")),
            f"{name}/val_loss": metrics.get(f"{name}/val_loss", float("nan")),
            f"{name}/n_demos": len(demos),
            f"{name}/steps": total,
        }
        if n_text:
            summary[f"{name}/loss_demo"] = metrics.get(f"{name}/loss_demo", float("nan"))
            summary[f"{name}/loss_text"] = metrics.get(f"{name}/loss_text", float("nan"))
            summary[f"{name}/text_rows_per_batch"] = n_text
        write_json(ctx.stage_dir / "summary.json", summary)
        return summary


@hookimpl
def register_stages(register: Callable[..., None]) -> None:
    register("pretrain", PretrainStage())
    register("sft", SFTStage("sft", SFTSection))
    register("rl_init", SFTStage("rl_init", RLInitSection))
