"""The **rm** stage: the SFT model with a scalar head, trained on the labeler's K-way rankings.

Loss (Ouyang et al. 2022, eq. 1), with all pairs of one prompt in one batch element::

    loss(θ) = −1/|prompts| Σ_prompt 1/n_pairs(prompt) Σ_(w,l) log σ(r_θ(x, y_w) − r_θ(x, y_l))

where ``n_pairs`` counts the prompt's non-tied pairs (``C(K, 2)`` when nothing ties). Held-out
pairwise accuracy is measured against the gold judge (pairs whose gold scores differ) with
torchmetrics, beside the labeler's own agreement with the gold judge (the ceiling).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from instructrl.core.config import Recipe
from instructrl.core.errors import DataError
from instructrl.core.fields import non_negative, param, positive, unit_interval
from instructrl.core.hookspecs import hookimpl
from instructrl.core.io import is_global_zero, write_json
from instructrl.core.protocols import Policy, Task
from instructrl.core.training import StageContext, devices
from instructrl.core.types import Completion, Prompt, Ranking, TokenBatch
from instructrl.plugins.hf import LearnedReward
from instructrl.plugins.models import (
    REWARD_STATS_FILE,
    load_scalar_head_model,
    load_tokenizer,
    save_model_dir,
    score_last_token,
)
from instructrl.plugins.stages.common import (
    batched,
    cache_blocks,
    check_sequence_fits,
    encode_pairs,
    fit,
    lr_lambda,
    make_trainer,
    resumable_loader,
    resume_path,
    sample_completions,
    score_completions,
    seed_everything,
    stage_checkpoint,
)
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAccuracy

if TYPE_CHECKING:
    from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class RMSection:
    """``rm``: the reward model trained on K-way rankings of SFT samples."""

    seed: int = param(0, "Seed of the RM stage (sampling for rankings and training).")
    model: str = param(
        "@sft", "Initialisation: '@sft' or an HF causal-LM dir; a scalar head is added.", model_path="input"
    )
    epochs: int = param(1, "Epochs over the rankings (paper: 1; more overfits).")
    batch_size: int = param(16, "Prompts per step; all C(K,2) pairs of a prompt are one batch element.")
    lr: float = param(3e-4, "Peak learning rate (AdamW), cosine decay.")
    warmup_ratio: float = param(0.05, "Fraction of steps spent in linear warmup.")
    weight_decay: float = param(0.0, "AdamW weight decay.")
    sample_temperature: float = param(1.0, "Temperature of the SFT samples the labeler ranks.")
    max_new_tokens: int = param(32, "Token budget of the SFT samples the labeler ranks.")

    def __post_init__(self) -> None:
        positive(self, "epochs", "batch_size", "lr", "sample_temperature", "max_new_tokens")
        non_negative(self, "weight_decay")
        unit_interval(self, "warmup_ratio")


class RankingBatch(NamedTuple):
    """Several prompts' rankings flattened into one TokenBatch.

    Attributes:
        batch: ``(N, P + R)`` every response of every prompt.
        winners / losers: ``(M,)`` row indices of each non-tied pair.
        weights: ``(M,)`` ``1 / n_pairs`` of the pair's prompt.
        n_prompts: prompts in the batch.
    """

    batch: TokenBatch
    winners: Tensor
    losers: Tensor
    weights: Tensor
    n_prompts: int


def rm_loss(scores: Tensor, winners: Tensor, losers: Tensor, weights: Tensor, n_prompts: int) -> Tensor:
    """InstructGPT RM loss: ``−Σ_pairs w · log σ(r_w − r_l) / n_prompts``.

    Args:
        scores: ``(N,)`` rewards of every response in the batch.
        winners, losers: ``(M,)`` indices into ``scores``.
        weights: ``(M,)`` per-pair weight ``1 / n_pairs(prompt)``.
        n_prompts: number of prompts (batch elements).
    """
    return -(weights * F.logsigmoid(scores[winners] - scores[losers])).sum() / n_prompts


def collate_rankings(
    tokenizer: PreTrainedTokenizerBase, rankings: Sequence[Ranking], max_prompt: int, max_response: int
) -> RankingBatch:
    """Flatten rankings into one TokenBatch plus pair indices and weights."""
    prompts: list[str] = []
    completions: list[Completion] = []
    winners: list[int] = []
    losers: list[int] = []
    weights: list[float] = []
    for r in rankings:
        offset = len(completions)
        prompts += [r.prompt.text] * len(r.responses)
        completions += list(r.responses)
        pairs = r.pairs()
        for w, lo in pairs:
            winners.append(offset + w)
            losers.append(offset + lo)
            weights.append(1.0 / len(pairs))
    batch = encode_pairs(tokenizer, prompts, completions, max_prompt, max_response)
    return RankingBatch(
        batch,
        torch.tensor(winners, dtype=torch.long),
        torch.tensor(losers, dtype=torch.long),
        torch.tensor(weights),
        len(rankings),
    )


class RewardModelModule(pl.LightningModule):
    """Trains a scalar-head model with :func:`rm_loss`."""

    def __init__(
        self, model: torch.nn.Module, *, lr: float, weight_decay: float, total_steps: int, warmup_steps: int
    ) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.total_steps, self.warmup_steps = (
            lr,
            weight_decay,
            total_steps,
            warmup_steps,
        )
        self.train_acc = MeanMetric()

    def on_fit_start(self) -> None:
        self.model.train()  # dropout is 0; train mode keeps Lightning's mode checks quiet

    def training_step(self, rb: RankingBatch, batch_idx: int) -> Tensor:
        scores = score_last_token(self.model, rb.batch)
        loss = rm_loss(scores, rb.winners, rb.losers, rb.weights, rb.n_prompts)
        acc = (scores[rb.winners] > scores[rb.losers]).float()
        self.train_acc.update(acc)
        self.log("rm/loss", loss, prog_bar=True, batch_size=rb.n_prompts)
        self.log("rm/train_accuracy", self.train_acc, prog_bar=True, on_step=False, on_epoch=True)
        self.log("rm/margin", (scores[rb.winners] - scores[rb.losers]).mean(), batch_size=rb.n_prompts)
        return loss

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(self.total_steps, self.warmup_steps, "cosine")
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def transfer_batch_to_device(
        self, batch: RankingBatch, device: torch.device, dataloader_idx: int
    ) -> RankingBatch:
        if isinstance(batch, RankingBatch):
            return RankingBatch(
                batch.batch.to(device),
                batch.winners.to(device),
                batch.losers.to(device),
                batch.weights.to(device),
                batch.n_prompts,
            )
        return super().transfer_batch_to_device(batch, device, dataloader_idx)


def make_sampler(
    policy: Policy, *, temperature: float, max_new_tokens: int, max_prompt: int
) -> Callable[[Sequence[Prompt], int], list[list[Completion]]]:
    """A ``sample(prompts, k)`` function drawing ``k`` completions per prompt from ``policy``."""

    def sample(prompts: Sequence[Prompt], k: int) -> list[list[Completion]]:
        flat = [p for p in prompts for _ in range(k)]
        out = sample_completions(
            policy, flat, max_prompt=max_prompt, max_new_tokens=max_new_tokens, temperature=temperature
        )
        return [out[i * k : (i + 1) * k] for i in range(len(prompts))]

    return sample


@torch.no_grad()
def evaluate_rankings(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rankings: Sequence[Ranking],
    task: Task,
    max_prompt: int,
    max_response: int,
) -> dict[str, float]:
    """Held-out pairwise accuracy of the RM against the gold judge and against the labeler.

    - ``rm/accuracy``: over pairs whose gold scores differ, the RM orders them as gold does.
    - ``rm/labeler_ceiling``: the labeler's agreement with gold on the same pairs (ties count ½):
      an RM trained on this labeler cannot be expected to beat it.
    - ``rm/accuracy_vs_labeler``: over the labeler's non-tied pairs.
    - ``rm/accuracy/<kind>``: accuracy vs gold split by the task's kind of pair (if it has one).
    """
    model.eval()
    acc_gold, acc_lab, ceiling = BinaryAccuracy(), BinaryAccuracy(), MeanMetric()
    kinds: dict[str, BinaryAccuracy] = {}
    for chunk in batched(list(rankings), 32):
        rb = collate_rankings(tokenizer, chunk, max_prompt, max_response)
        scores = score_last_token(model, rb.batch)
        offset = 0
        for r in chunk:
            k = len(r.responses)
            s = scores[offset : offset + k]
            offset += k
            for w, lo in r.pairs():
                acc_lab.update((s[w] > s[lo]).float().view(1), torch.ones(1, dtype=torch.long))
            if task.gold is None:
                continue
            g = task.gold.score([r.prompt] * k, list(r.responses))
            for i in range(k):
                for j in range(i + 1, k):
                    if g[i] == g[j]:
                        continue
                    target = torch.tensor([1 if g[i] > g[j] else 0])
                    pred = (s[i] > s[j]).float().view(1)
                    acc_gold.update(pred, target)
                    same = r.ranks[i] == r.ranks[j]
                    agree = 0.5 if same else float((r.ranks[i] < r.ranks[j]) == (g[i] > g[j]))
                    ceiling.update(torch.tensor(agree))
                    kind = task.pair_kind(r.prompt, r.responses[i], r.responses[j])
                    if kind is not None:
                        kinds.setdefault(kind, BinaryAccuracy()).update(pred, target)
    out = {"rm/accuracy_vs_labeler": float(acc_lab.compute()) if acc_lab.update_count else float("nan")}
    if task.gold is not None and acc_gold.update_count:
        out["rm/accuracy"] = float(acc_gold.compute())
        out["rm/labeler_ceiling"] = float(ceiling.compute())
        out["rm/n_eval_pairs"] = int(acc_gold.update_count)
        for kind, metric in sorted(kinds.items()):
            out[f"rm/accuracy/{kind}"] = float(metric.compute())
            out[f"rm/n_pairs/{kind}"] = int(metric.update_count)
    return out


def score_demos(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task, max_prompt: int, max_response: int
) -> Tensor:
    """``(N,)`` RM scores of the task's demonstrations, read as RL reads the reward (``demo_bias``
    subtracts their mean)."""
    demos = list(task.demonstrations())
    reward = LearnedReward(model, tokenizer, {})
    comps = [Completion(d.response, True) for d in demos]
    prompts = [d.prompt for d in demos]
    return score_completions(
        reward, tokenizer, prompts, comps, max_prompt=max_prompt, max_response=max_response
    )


class RMStage:
    """Train the reward model on K-way rankings of SFT samples."""

    sections = {"rm": RMSection}

    def inputs(self, recipe: Recipe) -> dict[str, object]:
        return {"rm.model": recipe.section("rm").model}

    def cache_key(self, recipe: Recipe) -> dict[str, object]:
        blocks = cache_blocks(recipe, "task", "rm", "trainer")
        blocks["max_prompt_tokens"] = recipe.section("rollout").max_prompt_tokens
        return blocks

    def skip(self, recipe: Recipe) -> tuple[str, str] | None:
        return None

    def check(self, recipe: Recipe) -> None:
        """The position rule (:func:`check_sequence_fits`)."""
        check_sequence_fits(recipe)

    def describe(self, recipe: Recipe) -> dict[str, object]:
        cfg = recipe.section("rm")
        return {
            "epochs": cfg.epochs,
            "prompts_per_step": cfg.batch_size * devices(recipe),
            "lr": cfg.lr,
            "sample_temperature": cfg.sample_temperature,
        }

    def run(self, ctx: StageContext) -> dict[str, object]:
        recipe = ctx.recipe
        cfg = recipe.section("rm")
        seed_everything(cfg.seed)
        src = ctx.resolve(cfg.model, "rm.model")
        tokenizer = load_tokenizer(src, "rm.model")
        task = ctx.build_task()
        max_prompt = recipe.section("rollout").max_prompt_tokens
        # 1. The labeler ranks K samples of the SFT policy per prompt.
        policy = ctx.build_policy(src)
        sample = make_sampler(
            policy,
            temperature=cfg.sample_temperature,
            max_new_tokens=cfg.max_new_tokens,
            max_prompt=max_prompt,
        )
        train = list(task.rankings("train", sample))
        held_out = list(task.rankings("eval", sample))
        if not train:
            raise DataError("task: no rankings with at least one non-tied pair for the rm stage")
        del policy
        max_response = cfg.max_new_tokens + 1
        random.Random(cfg.seed).shuffle(train)
        # 2. Train the scalar head model (initialised from SFT).
        model = load_scalar_head_model(src, "rm.model", tokenizer=tokenizer)
        steps = max(1, len(train) // (cfg.batch_size * devices(recipe))) * cfg.epochs
        module = RewardModelModule(
            model,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            total_steps=steps,
            warmup_steps=int(cfg.warmup_ratio * steps),
        )
        module.train_acc.persistent(True)  # the epoch's running accuracy survives a mid-epoch resume
        # data order: a seeded permutation per epoch, resumable mid-epoch (plugins.stages.common.EpochBatchSampler)
        loader = resumable_loader(
            train,
            cfg.batch_size,
            seed=cfg.seed,
            collate_fn=lambda rs: collate_rankings(tokenizer, rs, max_prompt, max_response),
        )
        trainer = make_trainer(
            ctx, checkpoint=stage_checkpoint(ctx, steps), max_epochs=cfg.epochs, use_distributed_sampler=False
        )
        fit_metrics = fit(trainer, module, loader, ckpt_path=resume_path(ctx))
        # 3. Held-out accuracy and the demonstrations' mean score (demo_bias reads it in RL).
        metrics = evaluate_rankings(model, tokenizer, held_out, task, max_prompt, max_response)
        demo_scores = score_demos(model, tokenizer, task, max_prompt, max_response)
        stats = {
            "demo_mean": float(demo_scores.mean()),
            "demo_std": float(demo_scores.std()) if len(demo_scores) > 1 else 0.0,
        }
        n_pairs = sum(len(r.pairs()) for r in train)
        possible = sum(len(r.responses) * (len(r.responses) - 1) // 2 for r in train)
        summary = {
            **metrics,
            "rm/loss": fit_metrics.get("rm/loss", float("nan")),
            "rm/train_accuracy": fit_metrics.get("rm/train_accuracy", float("nan")),
            "rm/n_train_prompts": len(train),
            "rm/n_train_pairs": n_pairs,
            "rm/tie_rate": 1.0 - n_pairs / max(1, possible),
            "rm/demo_mean": stats["demo_mean"],
        }
        if is_global_zero():
            save_model_dir(model, tokenizer, ctx.model_dir)
            write_json(ctx.model_dir / REWARD_STATS_FILE, stats)
        trainer.strategy.barrier()
        write_json(ctx.stage_dir / "summary.json", summary)
        return summary


@hookimpl
def register_stages(register: Callable[..., None]) -> None:
    register("rm", RMStage())
