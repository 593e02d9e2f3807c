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

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import lightning.pytorch as pl
import torch
from instructrl.core.config import Recipe
from instructrl.core.errors import ConfigError
from instructrl.core.fields import field_for_role, non_negative, param, positive
from instructrl.core.hookspecs import hookimpl
from instructrl.core.io import is_global_zero, require_model_dir, write_json
from instructrl.core.protocols import GoldJudge, Policy, RewardModel
from instructrl.core.training import StageContext
from instructrl.core.types import Generation, Prompt, RewardInput
from instructrl.plugins.stages.common import (
    batched,
    check_sequence_fits,
    encode_prompts,
    make_trainer,
    pad_right,
    seed_everything,
    tokenize_docs,
)
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric, SumMetric

if TYPE_CHECKING:
    pass


@dataclass
class EvalSection:
    """``eval``: held-out evaluation at the end of RL and every ``every`` iterations."""

    n_prompts: int = param(500, "Held-out prompts in the final evaluation.", resume_safe=True)
    every: int = param(25, "Evaluate every N RL iterations (0 = only at the end).", resume_safe=True)
    at: list[int] = param(
        help="Further RL iterations to evaluate after (counts from 1), besides every `every`: e.g. [1, 2, 4, 8] "
        "for a log-spaced over-optimisation curve.",
        factory=list,
        resume_safe=True,
    )
    n_prompts_during: int = param(128, "Held-out prompts in the periodic evaluation.", resume_safe=True)
    temperature: float = param(1.0, "Sampling temperature of the T=1 comparison.", resume_safe=True)
    greedy: bool = param(True, "Also compare greedy responses.", resume_safe=True)
    max_new_tokens: int | None = param(
        None, "Response budget; null = rollout.max_new_tokens.", resume_safe=True
    )
    batch_size: int = param(64, "Prompts per generation batch.", resume_safe=True)
    n_samples: int = param(
        24, "Rows in the samples table (samples/eval.jsonl and the report).", resume_safe=True
    )
    against: str | None = param(
        None,
        "The baseline of every win rate; null = the policy's initial weights (InstructGPT: the SFT model).",
        model_path="input",
        resume_safe=True,
    )
    pretrain_docs: int = param(
        256, "Held-out pretraining documents for the LM-loss (alignment tax) measurement.", resume_safe=True
    )

    def __post_init__(self) -> None:
        positive(self, "n_prompts", "n_prompts_during", "temperature", "batch_size", "pretrain_docs")
        non_negative(self, "every", "n_samples")
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 1 for i in self.at):
            raise ValueError(f"at must list RL iterations >= 1 (got {self.at})")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 or null (got {self.max_new_tokens})")


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

    gold: GoldJudge | None
    reward: RewardModel | None


def judge_scores(judges: Judges, prompts: Sequence[Prompt], gen: Generation) -> Tensor:
    """``(B,)`` gold scores (or reward-model scores when the task has no gold judge)."""
    if judges.gold is not None:
        return torch.tensor(judges.gold.score(list(prompts), gen.completions), dtype=torch.float)
    assert judges.reward is not None
    return judges.reward.score(
        RewardInput(prompts=list(prompts), completions=gen.completions, batch=gen.batch)
    ).float()


@torch.no_grad()
def eval_batch(
    policy: Policy,
    reference: Policy,
    judges: Judges,
    prompts: Sequence[Prompt],
    *,
    temperature: float,
    max_new_tokens: int,
    greedy: bool,
    max_prompt: int,
    kl_reference: Policy | None = None,
) -> tuple[dict[str, Tensor], Generation, Generation]:
    """Per-row statistics of one batch of held-out prompts (all ``(N,)`` float tensors), and the
    two generations (for the samples table).

    Keys: ``score`` / ``score_sft`` (judge scores at T), ``win``, ``strict_win``, ``strict_loss``,
    ``rm_score`` / ``rm_score_sft``, ``kl`` (nats per response, to ``reference``), ``length`` /
    ``length_sft``, ``eos`` / ``eos_sft``, with ``greedy`` the same comparison at T = 0
    (``*_greedy``), and with ``kl_reference`` (a KL reference that is not the baseline, e.g. the RL
    init) ``kl_ref``: the KL of the policy's samples to it.
    """
    ids, mask = encode_prompts(policy.tokenizer, [p.text for p in prompts], max_prompt)
    out: dict[str, Tensor] = {}
    rl = policy.generate(ids, mask, max_new_tokens=max_new_tokens, temperature=temperature)
    sft = reference.generate(ids, mask, max_new_tokens=max_new_tokens, temperature=temperature)
    a, b = judge_scores(judges, prompts, rl), judge_scores(judges, prompts, sft)
    w = win_stats(a, b)
    out.update(score=a, score_sft=b, win=w.win, strict_win=w.strict_win, strict_loss=w.strict_loss)
    if judges.gold is not None:
        for suffix, gen in (("", rl), ("_sft", sft)):
            for part, values in judges.gold.parts(list(prompts), gen.completions).items():
                out[f"gold_{part}{suffix}"] = torch.tensor(values, dtype=torch.float)
    if judges.reward is not None:
        for key, gen in (("rm_score", rl), ("rm_score_sft", sft)):
            inp = RewardInput(prompts=list(prompts), completions=gen.completions, batch=gen.batch)
            out[key] = judges.reward.score(inp).float()
    lp = policy.forward(rl.batch, temperature=temperature).logprobs
    lr = reference.forward(rl.batch, temperature=temperature).logprobs
    out["kl"] = ((lp - lr) * rl.batch.response_mask).sum(-1)
    if kl_reference is not None:
        lk = kl_reference.forward(rl.batch, temperature=temperature).logprobs
        out["kl_ref"] = ((lp - lk) * rl.batch.response_mask).sum(-1)
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
    return out, rl, sft


# The summary names of eval_batch's per-row keys (means over prompts).
def summary_name(key: str) -> str | None:
    """The summary name of one of :func:`eval_batch`'s keys (means over prompts), or ``None``."""
    return SUMMARY_NAMES.get(key) or (f"eval/{key}" if key.startswith("gold_") else None)


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
    "kl_ref": "eval/kl_to_ref",
    "length": "eval/response_length",
    "length_sft": "eval/response_length_sft",
    "eos": "eval/eos_rate",
    "eos_sft": "eval/eos_rate_sft",
}


@torch.no_grad()
def lm_loss_on(policy: Policy, docs: Sequence[str], max_len: int = 128, batch_size: int = 64) -> float:
    """Token-weighted mean next-token loss (nats/token) of ``policy`` on ``docs``."""
    total, count = 0.0, 0.0
    rows = tokenize_docs(policy.tokenizer, docs, max_len)
    for chunk in batched(rows, batch_size):
        ids, mask = pad_right(chunk, policy.tokenizer.pad_token_id)
        n = float((mask[:, 1:] * mask[:, :-1]).sum())
        total += float(policy.lm_loss(ids, mask)) * n
        count += n
    return total / max(count, 1.0)


class EvalModule(pl.LightningModule):
    """``trainer.test`` over held-out prompt batches; torchmetrics average across processes."""

    def __init__(
        self,
        policy: Policy,
        reference: Policy,
        judges: Judges,
        cfg: EvalSection,
        max_new_tokens: int,
        max_prompt: int,
    ) -> None:
        super().__init__()
        self.policy, self.reference, self.judges = policy, reference, judges
        self.cfg, self.max_new_tokens, self.max_prompt = cfg, max_new_tokens, max_prompt
        self.means = torch.nn.ModuleDict()
        self.count = SumMetric()
        self.samples: list[dict[str, object]] = []

    def test_step(self, prompts: list[Prompt], batch_idx: int) -> None:
        stats, rl, sft = eval_batch(
            self.policy, self.reference, self.judges, prompts, temperature=self.cfg.temperature,
            max_new_tokens=self.max_new_tokens, greedy=self.cfg.greedy, max_prompt=self.max_prompt,
        )  # fmt: skip
        for key, values in stats.items():
            if summary_name(key) is not None:
                if key not in self.means:
                    self.means[key] = MeanMetric()
                self.means[key].update(values)
        self.count.update(torch.tensor(float(len(prompts))))
        for i, p in enumerate(prompts[: max(0, self.cfg.n_samples - len(self.samples))]):
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

    def transfer_batch_to_device(
        self, batch: list[Prompt], device: torch.device, dataloader_idx: int
    ) -> list[Prompt]:
        return batch  # a list of Prompt (strings); tokenized inside test_step

    def on_test_epoch_end(self) -> None:
        self.log_dict(
            {k: float(v) for k, v in self.results().items()}, sync_dist=False
        )  # → RUN/eval/metrics.csv

    def results(self) -> dict[str, float]:
        out = {str(summary_name(k)): float(m.compute()) for k, m in self.means.items()}
        out["eval/n_prompts"] = int(self.count.compute())
        return out


def load_policy_dir(ctx: StageContext, path: str, key: str) -> Policy:
    """A policy component loaded from an HF dir through the recipe's policy kind."""
    require_model_dir(path, key)
    policy = ctx.build_policy(path)
    policy.model.eval()
    return policy


def run_evaluation(
    ctx: StageContext, policy_dir: str, reference_dir: str, base_dir: str | None, reward: RewardModel | None,
    *, record: bool = True,
) -> dict[str, object]:  # fmt: skip
    """Evaluate ``policy_dir`` against ``reference_dir`` on the task's held-out prompts, judged by
    the task's gold judge (or ``reward`` when the task has none). ``record`` writes the samples and
    ``summary.json`` and measures the baseline's pretraining-text loss; without it (a second policy
    against the same baseline) only the policy's numbers are computed beyond the comparison."""
    recipe = ctx.recipe
    cfg = recipe.section("eval")
    seed_everything(recipe.seed)
    task = ctx.build_task()
    prompts = list(task.prompts("eval"))[: cfg.n_prompts]
    if not prompts:
        raise ConfigError("task: no held-out eval prompts (task.prompts('eval') is empty)")
    policy = load_policy_dir(ctx, policy_dir, "eval.policy")
    reference = load_policy_dir(ctx, reference_dir, "eval.against")
    judges = Judges(task.gold, reward)
    if judges.gold is None and judges.reward is None:
        raise ConfigError(
            "eval: the task has no gold judge and no reward model is configured; nothing can judge the responses"
        )
    rollout = recipe.section("rollout")
    max_new = cfg.max_new_tokens or rollout.max_new_tokens
    module = EvalModule(policy, reference, judges, cfg, max_new, rollout.max_prompt_tokens)
    loader = DataLoader(prompts, batch_size=cfg.batch_size, collate_fn=list)
    trainer = make_trainer(ctx, enable_checkpointing=False)
    trainer.test(module, loader, verbose=False)
    summary: dict[str, object] = dict(module.results())
    summary["eval/judge"] = "gold" if judges.gold is not None else "reward_model"
    docs = list(task.pretraining_text("eval"))[: cfg.pretrain_docs]
    if docs:
        summary["eval/pretrain_loss"] = lm_loss_on(policy, docs)
        if record:  # a second policy against the same baseline: the baseline's loss is known
            summary["eval/pretrain_loss_sft"] = lm_loss_on(reference, docs)
        if base_dir:
            summary["eval/pretrain_loss_base"] = lm_loss_on(load_policy_dir(ctx, base_dir, "base"), docs)
    if record and is_global_zero():
        samples_dir = ctx.stage_dir / "samples"
        samples_dir.mkdir(parents=True, exist_ok=True)
        with open(samples_dir / "eval.jsonl", "w") as f:
            for row in module.samples:
                f.write(json.dumps(row) + "\n")
    if record:
        write_json(ctx.stage_dir / "summary.json", summary)
    return summary


def initial_weights(recipe: Recipe) -> str | None:
    """The policy's initial weights (its config field marked ``model_path="weights"``), or ``None``
    when the policy marks none."""
    conf = recipe.choice("policy").config
    name = field_for_role(type(conf), "weights") if conf is not None else None
    value = getattr(conf, name) if name is not None else None
    return str(value) if value else None


def against(recipe: Recipe) -> str:
    """The baseline policy dir (or ``@stage``): ``eval.against``, else the policy's initial weights."""
    cfg = recipe.section("eval")
    if cfg.against:
        return str(cfg.against)
    start = initial_weights(recipe)
    if start is None:
        raise ConfigError(
            f"eval.against: policy '{recipe.choice('policy').name}' marks no weights field; set eval.against"
        )
    return start


def rl_start(recipe: Recipe) -> str | None:
    """The policy's initial weights (``policy.model``: the RL init) when they are not the baseline
    (``eval.against``): reported beside the RL policy; else ``None``."""
    start = initial_weights(recipe)
    return start if start is not None and start != against(recipe) else None


INIT_KEYS = (
    "gold_score", "gold_content", "gold_format", "rm_score", "win_rate_vs_sft", "strict_win", "strict_loss",
    "kl_to_sft", "pretrain_loss",
)  # fmt: skip
"""What the eval stage reports of the RL start (``eval/rl_start/<key>``), against the same baseline."""


class EvalStage:
    """Compare the RL policy with the SFT policy on held-out prompts."""

    sections = {"eval": EvalSection}

    def inputs(self, recipe: Recipe) -> dict[str, object]:
        start = {"eval.rl_start": start} if (start := rl_start(recipe)) else {}
        return {
            "eval.policy": "@rl",
            "eval.against": against(recipe),
            **start,
            "reward": recipe.cfg.get("reward"),
        }

    def cache_key(self, recipe: Recipe) -> None:
        return None

    def skip(self, recipe: Recipe) -> tuple[str, str] | None:
        return None

    def check(self, recipe: Recipe) -> None:
        against(recipe)
        check_sequence_fits(recipe)

    def describe(self, recipe: Recipe) -> dict[str, object]:
        cfg = recipe.section("eval")
        return {
            "held_out_prompts": cfg.n_prompts,
            "against": against(recipe),
            "also_reported": f"the RL start {start} (eval/rl_start/*)"
            if (start := rl_start(recipe))
            else None,
            "temperature": cfg.temperature,
            "greedy": cfg.greedy,
            "every_rl_iterations": cfg.every,
        }

    def run(self, ctx: StageContext) -> dict[str, object]:
        reference = ctx.resolve(against(ctx.recipe), "eval.against")
        task = ctx.build_task()
        reward = ctx.build("reward", task=task, tokenizer=None)
        summary = run_evaluation(ctx, ctx.paths["rl"], reference, ctx.paths.get("pretrain"), reward)
        start = rl_start(ctx.recipe)
        if start is not None:  # the RL init's own numbers beside the RL policy's, same baseline and prompts
            init = run_evaluation(
                ctx, ctx.resolve(start, "policy.model"), reference, None, reward, record=False
            )
            summary.update(
                {f"eval/rl_start/{k}": init[f"eval/{k}"] for k in INIT_KEYS if f"eval/{k}" in init}
            )
            write_json(ctx.stage_dir / "summary.json", summary)
        return summary


class EvalCommand:
    """``instructrl eval MODEL_DIR --against SFT_DIR``: the eval stage on any two policy dirs."""

    key_value_options: tuple[str, ...] = ()

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model_dir")
        parser.add_argument("overrides", nargs="*", metavar="key=value")
        parser.add_argument("--against", help="the SFT (baseline) model dir (default: eval.against)")
        parser.add_argument("--recipe", default="ppo", help="recipe for the task, reward and eval settings")
        parser.add_argument("--out", help="write summary.json and samples here (default: MODEL_DIR/eval)")
        parser.add_argument("--smoke", action="store_true", help="the recipe's smoke sizes")
        parser.add_argument("--json", action="store_true", help="print the summary as JSON")

    def run(self, args: argparse.Namespace) -> int:
        from instructrl.core.cli import ArgumentError, format_summary
        from instructrl.core.config import load_recipe
        from instructrl.core.runner import model_paths

        quiet = ["trainer.enable_progress_bar=false"] if args.json else []  # stdout: the JSON alone
        recipe = load_recipe(args.recipe, [*quiet, *args.overrides], smoke=args.smoke)
        baseline = args.against or recipe.section("eval").against
        if not baseline or str(baseline).startswith("@"):
            raise ArgumentError(
                "instructrl eval: pass --against SFT_DIR (or set eval.against to a model dir)"
            )
        out = Path(args.out) if args.out else Path(args.model_dir) / "eval"
        out.mkdir(parents=True, exist_ok=True)
        ctx = StageContext(recipe, "eval", out, {}, run_name=out.name)
        # A standalone evaluation has no upstream stages: a reward model that reads a stage output is
        # left out and the task's gold judge decides (the summary's eval/judge says which).
        refs = [v for _, v in model_paths(recipe, {"reward": recipe.cfg.get("reward")}) if v.startswith("@")]
        reward = None if refs else ctx.build("reward", task=ctx.build_task())
        summary = run_evaluation(ctx, args.model_dir, str(baseline), None, reward)
        print(json.dumps(summary, indent=2) if args.json else format_summary(summary, out))
        return 0


@hookimpl
def register_stages(register: Callable[..., None]) -> None:
    register("eval", EvalStage())


@hookimpl
def register_commands(register: Callable[..., None]) -> None:
    register(
        "eval", EvalCommand(), description="evaluate a policy dir against an SFT dir on held-out prompts"
    )
