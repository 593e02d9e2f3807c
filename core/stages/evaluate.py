"""The **eval** stage (and the periodic evaluation inside RL): the RL policy against the SFT policy
on held-out prompts, judged by the task's gold judge.

- win rate (ties ½) at temperature T and greedy, strict wins/losses;
- mean gold score of each policy, the reward model's score of the RL policy;
- KL to SFT in nats per response: ``Σ_t (log π − log π_sft)`` over the RL policy's own samples
  (an unbiased estimate of KL(π ‖ π_sft) per sequence — the unit the adaptive controller uses);
- LM loss on held-out pretraining text for base / SFT / RL (the alignment tax);
- a samples table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric, SumMetric

from ..errors import ConfigError
from ..models import require_model_dir
from ..types import Completion, Prompt, RewardInput
from .common import (
    StageContext,
    batched,
    encode_prompts,
    is_global_zero,
    make_trainer,
    seed_everything,
    write_json,
)
from .lm import pad_right, tokenize_docs


class WinStats(NamedTuple):
    """Pairwise comparison of scores ``a`` (RL) against ``b`` (SFT), per row."""

    win: Tensor  # (N,) 1 if a > b, 0.5 if a == b, else 0
    strict_win: Tensor  # (N,) 1 if a > b
    strict_loss: Tensor  # (N,) 1 if a < b


def win_stats(a: Tensor, b: Tensor) -> WinStats:
    """Per-row win (ties count ½), strict win and strict loss of ``a`` over ``b`` (both ``(N,)``)."""
    gt = (a > b).float()
    lt = (a < b).float()
    return WinStats(gt + 0.5 * (1 - gt - lt), gt, lt)


class Judges(NamedTuple):
    """What an evaluation compares with: the task's gold judge and/or the reward model."""

    gold: Any
    reward: Any


def judge_scores(judges: Judges, prompts: Sequence[Prompt], gen: Any) -> Tensor:
    """``(B,)`` gold scores (or reward-model scores when the task has no gold judge)."""
    if judges.gold is not None:
        return torch.tensor(judges.gold.score(list(prompts), gen.completions), dtype=torch.float)
    return judges.reward.score(RewardInput(list(prompts), gen.completions, gen.batch)).float()


@torch.no_grad()
def eval_batch(
    policy: Any,
    reference: Any,
    judges: Judges,
    prompts: Sequence[Prompt],
    *,
    tokenizer: Any,
    temperature: float,
    max_new_tokens: int,
    greedy: bool,
    max_prompt: int = 128,
) -> dict[str, Tensor]:
    """Per-row statistics of one batch of held-out prompts (all ``(N,)`` float tensors).

    Keys: ``score`` / ``score_sft`` (judge scores at T), ``win``, ``strict_win``, ``strict_loss``,
    ``rm_score`` / ``rm_score_sft``, ``kl`` (nats per response), ``length`` / ``length_sft``,
    ``eos`` / ``eos_sft``, and with ``greedy`` the same comparison at T = 0 (``*_greedy``).
    """
    ids, mask = encode_prompts(tokenizer, [p.text for p in prompts], max_prompt)
    out: dict[str, Tensor] = {}
    rl = policy.generate(ids, mask, max_new_tokens=max_new_tokens, temperature=temperature)
    sft = reference.generate(ids, mask, max_new_tokens=max_new_tokens, temperature=temperature)
    a, b = judge_scores(judges, prompts, rl), judge_scores(judges, prompts, sft)
    w = win_stats(a, b)
    out.update(score=a, score_sft=b, win=w.win, strict_win=w.strict_win, strict_loss=w.strict_loss)
    if judges.reward is not None:
        out["rm_score"] = judges.reward.score(RewardInput(list(prompts), rl.completions, rl.batch)).float()
        out["rm_score_sft"] = judges.reward.score(
            RewardInput(list(prompts), sft.completions, sft.batch)
        ).float()
    lp = policy.forward(rl.batch, temperature=temperature).logprobs
    lr = reference.forward(rl.batch, temperature=temperature).logprobs
    out["kl"] = ((lp - lr) * rl.batch.response_mask).sum(-1)
    out["length"] = rl.batch.response_mask.sum(-1)
    out["length_sft"] = sft.batch.response_mask.sum(-1)
    out["eos"] = rl.ended.float()
    out["eos_sft"] = sft.ended.float()
    if greedy:
        rg = policy.generate(ids, mask, max_new_tokens=max_new_tokens, temperature=1.0, greedy=True)
        sg = reference.generate(ids, mask, max_new_tokens=max_new_tokens, temperature=1.0, greedy=True)
        ga, gb = judge_scores(judges, prompts, rg), judge_scores(judges, prompts, sg)
        wg = win_stats(ga, gb)
        out.update(
            score_greedy=ga,
            score_sft_greedy=gb,
            win_greedy=wg.win,
            strict_win_greedy=wg.strict_win,
            strict_loss_greedy=wg.strict_loss,
        )
    out["_rl"] = rl  # type: ignore[assignment]  # for the samples table
    out["_sft"] = sft  # type: ignore[assignment]
    return out


# The summary names of eval_batch's per-row keys (means over prompts).
SUMMARY_NAMES = {
    "win": "eval/win_rate_vs_sft",
    "strict_win": "eval/strict_win",
    "strict_loss": "eval/strict_loss",
    "win_greedy": "eval/win_rate_vs_sft_greedy",
    "strict_win_greedy": "eval/strict_win_greedy",
    "strict_loss_greedy": "eval/strict_loss_greedy",
    "score": "eval/gold_score",
    "score_sft": "eval/gold_score_sft",
    "score_greedy": "eval/gold_score_greedy",
    "score_sft_greedy": "eval/gold_score_sft_greedy",
    "rm_score": "eval/rm_score",
    "rm_score_sft": "eval/rm_score_sft",
    "kl": "eval/kl_to_sft",
    "length": "eval/response_length",
    "length_sft": "eval/response_length_sft",
    "eos": "eval/eos_rate",
    "eos_sft": "eval/eos_rate_sft",
}


@torch.no_grad()
def lm_loss_on(
    policy: Any, tokenizer: Any, docs: Sequence[str], max_len: int = 128, batch_size: int = 64
) -> float:
    """Token-weighted mean next-token loss (nats/token) of ``policy`` on ``docs``."""
    total, count = 0.0, 0.0
    rows = tokenize_docs(tokenizer, docs, max_len)
    for chunk in batched(rows, batch_size):
        ids, mask = pad_right(chunk, tokenizer.pad_token_id)
        n = float((mask[:, 1:] * mask[:, :-1]).sum())
        total += float(policy.lm_loss(ids, mask)) * n
        count += n
    return total / max(count, 1.0)


class EvalModule(pl.LightningModule):
    """``trainer.test`` over held-out prompt batches; torchmetrics average across processes."""

    def __init__(
        self,
        policy: Any,
        reference: Any,
        judges: Judges,
        tokenizer: Any,
        cfg: Any,
        max_new_tokens: int,
        n_samples: int,
    ) -> None:
        super().__init__()
        self.policy, self.reference, self.judges, self.tok = policy, reference, judges, tokenizer
        self.cfg, self.max_new_tokens, self.n_samples = cfg, max_new_tokens, n_samples
        self.means = torch.nn.ModuleDict({k: MeanMetric() for k in SUMMARY_NAMES})
        self.count = SumMetric()
        self.samples: list[dict[str, Any]] = []

    def test_step(self, prompts: list[Prompt], batch_idx: int) -> None:
        stats = eval_batch(
            self.policy, self.reference, self.judges, prompts, tokenizer=self.tok, temperature=self.cfg.temperature,
            max_new_tokens=self.max_new_tokens, greedy=self.cfg.greedy,
        )  # fmt: skip
        for key in SUMMARY_NAMES:
            if key in stats:
                self.means[key].update(stats[key])
        self.count.update(torch.tensor(float(len(prompts))))
        if len(self.samples) < self.n_samples:
            rl, sft = stats["_rl"], stats["_sft"]
            for i, p in enumerate(prompts[: self.n_samples - len(self.samples)]):
                self.samples.append(
                    {
                        "prompt": p.text,
                        "rl": rl.completions[i].text,
                        "rl_ended": rl.completions[i].ended,
                        "sft": sft.completions[i].text,
                        "sft_ended": sft.completions[i].ended,
                        "score": float(stats["score"][i]),
                        "score_sft": float(stats["score_sft"][i]),
                    }
                )

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        return batch  # a list of Prompt (strings); tokenized inside test_step

    def results(self) -> dict[str, float]:
        out = {
            name: float(self.means[k].compute())
            for k, name in SUMMARY_NAMES.items()
            if self.means[k].update_count
        }
        out["eval/n_prompts"] = int(self.count.compute())
        return out


def collate_prompts(items: list[Prompt]) -> list[Prompt]:
    return items


def load_policy_dir(ctx: StageContext, path: str, key: str) -> Any:
    """A policy component loaded from an HF dir through the recipe's policy kind."""
    require_model_dir(path, key)
    policy = ctx.build_policy(path)
    policy.model.eval()
    return policy


def run_evaluation(
    ctx: StageContext, policy_dir: str, reference_dir: str, base_dir: str | None
) -> dict[str, Any]:
    """Evaluate ``policy_dir`` against ``reference_dir`` on the task's held-out prompts."""
    recipe = ctx.recipe
    cfg = recipe.section("eval")
    seed_everything(recipe.seed)
    task = ctx.build_task()
    prompts = list(task.prompts("eval"))[: cfg.n_prompts]
    if not prompts:
        raise ConfigError("task: no held-out eval prompts (task.prompts('eval') is empty)")
    policy = load_policy_dir(ctx, policy_dir, "policy")
    reference = load_policy_dir(ctx, reference_dir, "reference")
    reward = build_reward(ctx, policy.tokenizer, task)
    judges = Judges(task.gold, reward)
    if judges.gold is None and judges.reward is None:
        raise ConfigError(
            "eval: the task has no gold judge and no reward model is configured; nothing can judge the responses"
        )
    max_new = cfg.max_new_tokens or recipe.section("rollout").max_new_tokens
    module = EvalModule(policy, reference, judges, policy.tokenizer, cfg, max_new, cfg.n_samples)
    loader = DataLoader(prompts, batch_size=cfg.batch_size, collate_fn=collate_prompts)
    trainer = make_trainer(ctx, enable_checkpointing=False)
    trainer.test(module, loader, verbose=False)
    summary: dict[str, Any] = module.results()
    summary["eval/judge"] = "gold" if judges.gold is not None else "reward_model"
    docs = list(task.pretraining_text("eval"))[: cfg.pretrain_docs]
    if docs:
        summary["eval/pretrain_loss"] = lm_loss_on(policy, policy.tokenizer, docs)
        summary["eval/pretrain_loss_sft"] = lm_loss_on(reference, reference.tokenizer, docs)
        if base_dir:
            base = load_policy_dir(ctx, base_dir, "base")
            summary["eval/pretrain_loss_base"] = lm_loss_on(base, base.tokenizer, docs)
    if is_global_zero():
        samples_dir = ctx.stage_dir / "samples"
        samples_dir.mkdir(parents=True, exist_ok=True)
        with open(samples_dir / "eval.jsonl", "w") as f:
            for row in module.samples:
                f.write(json.dumps(row) + "\n")
    write_json(ctx.stage_dir / "summary.json", summary)
    return summary


def build_reward(ctx: StageContext, tokenizer: Any, task: Any) -> Any:
    """The recipe's reward model (``None`` if it cannot be built because its model is absent)."""
    choice = ctx.recipe.choice("reward")
    bctx = ctx.build_context(seed=ctx.recipe.seed, task=task, tokenizer=tokenizer)
    return ctx.recipe.registry.build("reward_model", choice.name, choice.config, bctx)


class EvalStage:
    """Compare the RL policy with the SFT policy on held-out prompts."""

    name = "eval"
    reads = ()
    cacheable = False

    def describe(self, recipe: Any) -> dict[str, Any]:
        cfg = recipe.section("eval")
        return {
            "held_out_prompts": cfg.n_prompts,
            "temperature": cfg.temperature,
            "greedy": cfg.greedy,
            "every_rl_iterations": cfg.every,
        }

    def run(self, ctx: StageContext) -> dict[str, Any]:
        policy_cfg = ctx.recipe.choice("policy").config
        reference = ctx.resolve(getattr(policy_cfg, "ref_model", None) or policy_cfg.model, "policy.model")
        return run_evaluation(ctx, ctx.paths["rl"], reference, ctx.paths.get("pretrain"))


def write_samples_markdown(path: Path, samples: Sequence[dict[str, Any]]) -> None:
    """The samples table as markdown (for reports)."""
    lines = ["| prompt | SFT | RL | gold SFT | gold RL |", "|---|---|---|---|---|"]
    for s in samples:
        esc = [str(s[k]).replace("\n", "⏎").replace("|", "\\|") for k in ("prompt", "sft", "rl")]
        lines.append(f"| {esc[0]} | {esc[1]} | {esc[2]} | {s['score_sft']:.2f} | {s['score']:.2f} |")
    path.write_text("\n".join(lines) + "\n")


__all__ = ["EvalStage", "WinStats", "eval_batch", "run_evaluation", "win_stats", "Completion"]
