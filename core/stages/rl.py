"""The **rl** stage: PPO (and its alternatives) against a reward model, as one LightningModule with
manual optimisation.

One Lightning *epoch* is one RL iteration:

- ``on_train_epoch_start`` → :meth:`RLModule.make_experience` — steps 1–5 (rollout, score,
  reference, shape, advantages) under ``no_grad``;
- each ``training_step`` → step 6 on one micro-batch (an optimiser step closes every minibatch);
- ``on_train_epoch_end`` → step 7 (log; update the KL controller; periodic evaluation).

Each ``training_step`` runs one forward and one backward through Lightning's strategy wrapper, so
DDP (and FSDP2) synchronise gradients the way they expect; every whitening statistic is global
across processes (``core.ops``).
"""

from __future__ import annotations

import math
import random
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor
from torch.utils.data import DataLoader

from ..config import Recipe, samples_per_prompt
from ..errors import ConfigError, RunFailure
from ..ops import aggregate, all_reduce_sum, distributed, masked_mean, masked_var
from ..types import AdvantageInput, KLInput, ObjectiveInput, Prompt, RewardInput, ShapingInput, TokenBatch
from .common import (
    StageContext,
    Timer,
    encode_prompts,
    fit,
    is_global_zero,
    make_trainer,
    seed_everything,
    write_json,
)
from .evaluate import SUMMARY_NAMES, Judges, eval_batch

RATIO_TOL_FP32 = 1e-4
APPROX_KL_TOL_FP32 = 1e-6
RATIO_TOL_BF16 = 5e-2  # bf16 rounds logits to ~3 significant digits; the check still catches layout bugs
APPROX_KL_TOL_BF16 = 1e-3
MAX_PROMPT_TOKENS = 128


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, clip: float | None) -> Tensor:
    """Per-token PPO value loss ``½·max((V − G)², (V_clip − G)²)`` (lm-human-preferences, PPO2).

    ``V_clip = V_old + clip(V − V_old, −c, c)``; without ``clip`` it is ``½(V − G)²``.
    Shape: all ``(B, R)``; returns ``(B, R)`` (unmasked).
    """
    loss = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    return 0.5 * loss


def per_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """InstructGPT's per-token reward: ``−β·KL_t`` on every response token, plus the sequence
    score on the last real token (the EOS, or the last token of a truncated response).

    Args:
        scores: ``(B,)`` shaped sequence scores.
        kl: ``(B, R)`` per-token KL estimates (0 on padding).
        mask: ``(B, R)`` right-padded response mask.
        beta: the KL coefficient (0 when the KL is placed in the loss instead).
    Returns:
        ``(B, R)`` rewards, 0 on padding.
    """
    rewards = -beta * kl * mask
    last = (mask.sum(-1).long() - 1).clamp_min(0)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores
    return rewards


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 − Var[G − V] / Var[G]`` over masked tokens (global across processes)."""
    var_g = masked_var(returns, mask, global_=True)
    return 1 - masked_var(returns - values, mask, global_=True) / var_g.clamp_min(1e-8)


class Experience(NamedTuple):
    """One iteration's rollouts with everything step 6 needs. Shapes: ``(B, R)`` unless noted."""

    batch: TokenBatch
    old_logprobs: Tensor
    ref_logprobs: Tensor
    ref_logits: Tensor | None  # (B, R, V) only for KL estimators that need logits
    values: Tensor | None
    advantages: Tensor
    returns: Tensor | None


class RLComponents(NamedTuple):
    """Everything the RL stage builds from the recipe."""

    task: Any
    policy: Any
    reference: Any
    value: Any
    reward: Any
    transforms: list[tuple[str, Any]]
    kl_estimator: Any
    kl_controller: Any
    advantage: Any
    objective: Any
    extra_losses: list[tuple[str, Any]]


def build_components(ctx: StageContext) -> RLComponents:
    """Build every RL component through the registry, in dependency order."""
    recipe = ctx.recipe
    reg = recipe.registry
    seed = recipe.seed

    def build(key: str, **kw: Any) -> Any:
        c = recipe.choice(key)
        return reg.build(c.kind, c.name, c.config, ctx.build_context(seed=seed, **kw))

    task = build("task")
    policy = build("policy")
    tokenizer = policy.tokenizer
    reference = policy.reference()
    advantage = build("advantage")
    value = build("value", tokenizer=tokenizer) if advantage.needs_values else None
    reward = build("reward", task=task, tokenizer=tokenizer)
    rollout = recipe.section("rollout")
    calibration = {
        "score_demonstrations": lambda: score_demonstrations(task, reward, tokenizer, rollout.max_new_tokens),
        "score_reference_samples": lambda n: score_reference_samples(
            task, reference, reward, tokenizer, n, rollout, seed
        ),
    }
    transforms = []
    for c in recipe.transforms:
        bctx = ctx.build_context(
            seed=seed, task=task, tokenizer=tokenizer, reward_model=reward, extras=dict(calibration)
        )
        transforms.append((c.name, reg.build(c.kind, c.name, c.config, bctx)))
    kl_estimator = build("kl.estimator")
    kl_controller = build("kl.controller")
    objective = build("objective")
    extra = [
        (
            c.name,
            reg.build(c.kind, c.name, c.config, ctx.build_context(seed=seed, task=task, tokenizer=tokenizer)),
        )
        for c in recipe.extra_losses
    ]
    return RLComponents(
        task,
        policy,
        reference,
        value,
        reward,
        transforms,
        kl_estimator,
        kl_controller,
        advantage,
        objective,
        extra,
    )


@torch.no_grad()
def score_demonstrations(task: Any, reward: Any, tokenizer: Any, max_new_tokens: int) -> Tensor:
    """``(N,)`` reward-model scores of the task's demonstrations (for ``demo_bias``)."""
    from ..types import Completion
    from .common import encode_pairs

    demos = list(task.demonstrations())
    out = []
    for lo in range(0, len(demos), 128):
        chunk = demos[lo : lo + 128]
        comps = [Completion(d.response, True) for d in chunk]
        tb = encode_pairs(
            tokenizer, [d.prompt.text for d in chunk], comps, MAX_PROMPT_TOKENS, max_new_tokens + 1
        )
        out.append(reward.score(RewardInput([d.prompt for d in chunk], comps, tb)))
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def score_reference_samples(
    task: Any, reference: Any, reward: Any, tokenizer: Any, n: int, rollout: Any, seed: int
) -> Tensor:
    """``(n,)`` reward-model scores of reference-policy samples on RL prompts (for ``gain_bias``)."""
    prompts = list(task.prompts("rl"))
    rng = random.Random(seed + 7919)
    chosen = [prompts[rng.randrange(len(prompts))] for _ in range(n)]
    out = []
    torch.manual_seed(seed + 7919)
    for lo in range(0, n, 128):
        chunk = chosen[lo : lo + 128]
        ids, mask = encode_prompts(tokenizer, [p.text for p in chunk], MAX_PROMPT_TOKENS)
        gen = reference.generate(
            ids, mask, max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature
        )
        out.append(reward.score(RewardInput(chunk, gen.completions, gen.batch)))
    return torch.cat(out) if out else torch.zeros(0)


class UpdateIndex(torch.utils.data.Dataset):
    """The ``updates_per_iteration`` micro-steps of one RL iteration (one Lightning epoch)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class RLModule(pl.LightningModule):
    """PPO-style RL with swappable components; see the module docstring for the loop layout."""

    def __init__(self, recipe: Recipe, comps: RLComponents, eval_prompts: list[Prompt]) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.recipe = recipe
        self.c = comps
        # Trained modules are registered (optimised, checkpointed, wrapped by the strategy);
        # the reference and the reward model stay outside the module tree (frozen, not saved).
        self.policy_net = comps.policy.model
        self.value_net = comps.value.model if comps.value is not None else None
        self.rollout = recipe.section("rollout")
        self.rl = recipe.section("rl")
        self.value_cfg = recipe.section("value")
        self.kl_cfg = recipe.section("kl")
        self.eval_cfg = recipe.section("eval")
        self.samples = samples_per_prompt(recipe)
        self.episodes = self.rollout.prompts_per_iteration * self.samples
        self.minibatch = self.episodes // self.rl.minibatches
        self.micro = self.rl.micro_batch_size or self.minibatch
        self.micro_per_minibatch = self.minibatch // self.micro
        self.updates = self.rl.epochs * self.rl.minibatches * self.micro_per_minibatch
        self.eval_prompts = eval_prompts
        self.rl_prompts = list(comps.task.prompts("rl"))
        if not self.rl_prompts:
            raise ConfigError("task: no RL prompts (task.prompts('rl') is empty)")
        self.timer = Timer()
        self.exp: Experience | None = None
        self.stats: dict[str, list[Tensor]] = {}
        self.iter_metrics: dict[str, float] = {}
        self.order: Tensor | None = None
        self.last_eval: dict[str, float] = {}

    # ------------------------------------------------------------------ set-up
    def configure_optimizers(self) -> Any:
        opts = [
            torch.optim.AdamW(
                self.policy_net.parameters(), lr=self.rl.lr, weight_decay=self.rl.weight_decay, eps=1e-5
            )
        ]
        if self.value_net is not None:
            opts.append(
                torch.optim.AdamW(
                    self.value_net.parameters(),
                    lr=self.value_cfg.lr,
                    weight_decay=self.rl.weight_decay,
                    eps=1e-5,
                )
            )
        warm = self.rl.warmup_iterations * self.rl.epochs * self.rl.minibatches
        scheds = [
            torch.optim.lr_scheduler.LambdaLR(o, lambda s, w=warm: min(1.0, (s + 1) / w) if w else 1.0)
            for o in opts
        ]
        return opts, scheds

    def train_dataloader(self) -> DataLoader:
        return DataLoader(UpdateIndex(self.updates), batch_size=None, shuffle=False)

    @property
    def precision_context(self) -> Any:
        return self.trainer.precision_plugin.forward_context()

    def on_fit_start(self) -> None:
        # Dropout is off in every trained model (InstructGPT PPO), so train mode changes nothing
        # numerically; it keeps the modules in the mode Lightning expects.
        self.policy_net.train()
        if self.value_net is not None:
            self.value_net.train()

    # ------------------------------------------------------------------ steps 1-5
    def prompts_for(self, iteration: int) -> list[Prompt]:
        """This process's prompts for ``iteration``: a seeded shuffle of the RL prompts, cycled."""
        n, world, rank = self.rollout.prompts_per_iteration, self.trainer.world_size, self.trainer.global_rank
        per_pass = max(1, len(self.rl_prompts) // (n * world))
        pass_idx, slot = divmod(iteration, per_pass)
        order = list(range(len(self.rl_prompts)))
        random.Random(self.recipe.seed * 1_000_003 + pass_idx).shuffle(order)
        start = (slot * world + rank) * n
        return [self.rl_prompts[order[(start + i) % len(order)]] for i in range(n)]

    @torch.no_grad()
    def make_experience(self, iteration: int) -> Experience:
        """Steps 1–5 of one RL iteration."""
        c, ro, t = self.c, self.rollout, self.timer
        k = self.samples
        prompts = [p for p in self.prompts_for(iteration) for _ in range(k)]
        group_ids = torch.arange(len(prompts), device=self.device) // k
        ids, mask = encode_prompts(c.policy.tokenizer, [p.text for p in prompts], MAX_PROMPT_TOKENS)
        ids, mask = ids.to(self.device), mask.to(self.device)
        torch.manual_seed(self.recipe.seed * 7_919 + iteration * 104_729 + self.trainer.global_rank)

        # 1. rollout: responses (+ logprobs at the sampling temperature, step 3)
        with t("rollout"):
            gen = c.policy.generate(ids, mask, max_new_tokens=ro.max_new_tokens, temperature=ro.temperature)
        batch, rmask = gen.batch, gen.batch.response_mask

        # 2. score: reward model at the last real token
        with t("score"):
            scores = c.reward.score(RewardInput(prompts, gen.completions, batch)).float()
            baseline = None
            if c.advantage.needs_greedy_baseline:
                greedy = c.policy.generate(
                    ids, mask, max_new_tokens=ro.max_new_tokens, temperature=ro.temperature, greedy=True
                )
                baseline_raw = c.reward.score(RewardInput(prompts, greedy.completions, greedy.batch)).float()

        # 3. reference: old logprobs, reference logprobs, values
        needs_logits = bool(getattr(c.kl_estimator, "needs_logits", False))
        with t("reference"), self.precision_context:
            old = c.policy.forward(batch, temperature=ro.temperature, return_logits=needs_logits)
            ref = c.reference.forward(batch, temperature=ro.temperature, return_logits=needs_logits)
            values = c.value.values(batch).float() if c.value is not None else None

        # 4. shape: reward transforms on the sequence scores, then the per-token KL penalty
        lengths = rmask.sum(-1).long()
        shaped, transform_metrics = self.apply_transforms(scores, gen.ended, lengths)
        if c.advantage.needs_greedy_baseline:
            g_len = greedy.batch.response_mask.sum(-1).long()
            baseline, _ = self.apply_transforms(baseline_raw, greedy.ended, g_len, log=False)
        kl_tok = c.kl_estimator(KLInput(old.logprobs, ref.logprobs, old.logits, ref.logits)).float() * rmask
        beta = float(c.kl_controller.coef)
        rewards = per_token_rewards(shaped, kl_tok, rmask, beta if self.kl_cfg.placement == "reward" else 0.0)

        # 5. advantages
        adv = c.advantage(AdvantageInput(rewards, values, rmask, group_ids, baseline))

        # statistics of this rollout (step 7 logs them with the training statistics)
        kl_seq = kl_tok.sum(-1)
        m = {
            "reward/raw": _gmean(scores),
            "reward/shaped": _gmean(shaped),
            "reward/total": _gmean(rewards.sum(-1)),
            "kl/value": _gmean(kl_seq),
            "kl/per_token": float(masked_mean(kl_tok, rmask, global_=True)),
            "kl/coef": beta,
            "advantage/mean": float(masked_mean(adv.advantages, rmask, global_=True)),
            "advantage/std": float(masked_var(adv.advantages, rmask, global_=True).sqrt()),
            "response/length": _gmean(lengths.float()),
            "response/eos_rate": _gmean(gen.ended.float()),
            "policy/entropy_rollout": float(masked_mean(old.entropy, rmask, global_=True)),
            **transform_metrics,
        }
        if baseline is not None:
            m["reward/baseline"] = _gmean(baseline)
        if values is not None and adv.returns is not None:
            m["value/explained_variance"] = float(explained_variance(values, adv.returns, rmask))
            m["value/mean"] = float(masked_mean(values, rmask, global_=True))
            m["returns/mean"] = float(masked_mean(adv.returns, rmask, global_=True))
        self.iter_metrics = m
        self._kl_for_controller = m["kl/value"]
        return Experience(
            batch,
            old.logprobs,
            ref.logprobs,
            ref.logits if needs_logits else None,
            values,
            adv.advantages,
            adv.returns,
        )

    def apply_transforms(
        self, scores: Tensor, ended: Tensor, lengths: Tensor, log: bool = True
    ) -> tuple[Tensor, dict[str, float]]:
        """Apply the reward transforms in order; metrics ``reward/after/<name>`` after each."""
        metrics: dict[str, float] = {}
        s = scores
        for i, (name, transform) in enumerate(self.c.transforms):
            s = transform(ShapingInput(s, ended, lengths, self.rollout.max_new_tokens)).float()
            if log:
                key = (
                    f"reward/after/{name}"
                    if f"reward/after/{name}" not in metrics
                    else f"reward/after/{i}_{name}"
                )
                metrics[key] = _gmean(s)
        return s, metrics

    # ------------------------------------------------------------------ step 6
    def on_train_epoch_start(self) -> None:
        self.exp = self.make_experience(self.current_epoch)
        self.stats = {}
        gen = torch.Generator().manual_seed(self.recipe.seed * 31 + self.current_epoch)
        self.order = torch.stack(
            [torch.randperm(self.episodes, generator=gen) for _ in range(self.rl.epochs)]
        ).to(self.device)

    def training_step(self, update: int, batch_idx: int) -> None:
        """Step 6 on one micro-batch; the last micro-batch of a minibatch steps the optimisers."""
        exp, c, ro = self.exp, self.c, self.rollout
        assert exp is not None and self.order is not None
        epoch, rest = divmod(int(update), self.rl.minibatches * self.micro_per_minibatch)
        mb, micro = divmod(rest, self.micro_per_minibatch)
        lo = mb * self.minibatch + micro * self.micro
        rows = self.order[epoch, lo : lo + self.micro]
        mb_rows = self.order[epoch, mb * self.minibatch : (mb + 1) * self.minibatch]
        batch = exp.batch.select(rows)
        mask = batch.response_mask
        mb_tokens = exp.batch.response_mask[mb_rows].sum().clamp_min(1.0)
        norm = {"num_seqs": self.minibatch, "num_tokens": mb_tokens, "norm_len": ro.max_new_tokens}

        with self.timer("train"):
            need_logits = self.kl_cfg.placement == "loss" and bool(
                getattr(c.kl_estimator, "needs_logits", False)
            )
            out = c.policy.forward(batch, temperature=ro.temperature, return_logits=need_logits)
            old = exp.old_logprobs[rows]
            if update == 0:
                self.check_invariant(out.logprobs, old, mask)
            obj = c.objective(ObjectiveInput(out.logprobs, old, exp.advantages[rows], mask))
            per_token = obj.loss
            beta = float(c.kl_controller.coef)
            if self.kl_cfg.placement == "loss":
                ref_logits = exp.ref_logits[rows] if exp.ref_logits is not None else None
                kl = c.kl_estimator(KLInput(out.logprobs, exp.ref_logprobs[rows], out.logits, ref_logits))
                per_token = per_token + beta * kl
                self._acc("kl/loss_term", masked_mean(kl.detach(), mask))
            if self.rl.entropy_coef:
                per_token = per_token - self.rl.entropy_coef * out.entropy
            loss = aggregate(per_token, mask, c.objective.aggregation, **norm)
            self._acc("policy/loss", loss.detach() * self.micro_per_minibatch)
            for name, v in obj.metrics.items():
                self._acc(f"policy/{name}", v)
            self._acc("policy/entropy", masked_mean(out.entropy.detach(), mask))
            if c.value is not None and exp.returns is not None:
                v = c.value.values(batch).float()
                vl_tok = clipped_value_loss(v, exp.values[rows], exp.returns[rows], self.value_cfg.clip)
                vloss = aggregate(vl_tok, mask, "token_mean", num_tokens=mb_tokens)
                loss = loss + self.value_cfg.coef * vloss
                self._acc("value/loss", vloss.detach() * self.micro_per_minibatch)
                if self.value_cfg.clip is not None:
                    clipped = ((v - exp.values[rows]).abs() > self.value_cfg.clip).float()
                    self._acc("value/clip_frac", masked_mean(clipped, mask))
            last_micro = micro == self.micro_per_minibatch - 1
            if last_micro:
                # extra losses (ptx) once per optimiser step, at full weight
                for name, extra in c.extra_losses:
                    e = extra(c.policy, self.global_step)
                    loss = loss + e.loss
                    for k, v in e.metrics.items():
                        self._acc(f"{name}/{k}", v)
            self.manual_backward(loss)
            if last_micro:
                self.optimizer_step_all()

    def optimizer_step_all(self) -> None:
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        scheds = self.lr_schedulers()
        scheds = scheds if isinstance(scheds, list) else ([scheds] if scheds is not None else [])
        for opt in opts:
            if self.rl.grad_clip is not None:
                self.clip_gradients(opt, gradient_clip_val=self.rl.grad_clip, gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad(set_to_none=True)
        for s in scheds:
            s.step()

    def check_invariant(self, logprobs: Tensor, old: Tensor, mask: Tensor) -> None:
        """Before any update of an iteration the policy *is* the rollout policy: ratio == 1."""
        log_ratio = (logprobs.detach() - old) * mask
        ratio_dev = float((log_ratio.exp() - 1).abs().max())
        approx_kl = float(masked_mean((log_ratio.exp() - 1) - log_ratio, mask))
        self.iter_metrics["invariant/ratio_dev"] = ratio_dev
        self.iter_metrics["invariant/approx_kl"] = approx_kl
        if not self.rl.check_ratio:
            return
        bf16 = "bf16" in str(self.trainer.precision) or "16" in str(self.trainer.precision)
        tol_r, tol_k = (RATIO_TOL_BF16, APPROX_KL_TOL_BF16) if bf16 else (RATIO_TOL_FP32, APPROX_KL_TOL_FP32)
        if ratio_dev > tol_r or approx_kl > tol_k:
            raise RunFailure(
                f"rl: ratio invariant violated on the first minibatch of iteration {self.current_epoch}: "
                f"max|ratio-1|={ratio_dev:.2e} (bound {tol_r:.0e}), approx-KL={approx_kl:.2e} (bound {tol_k:.0e}); "
                "rollout and training disagree (padding, position ids, temperature or dropout)"
            )

    def _acc(self, key: str, value: Tensor | float) -> None:
        self.stats.setdefault(key, []).append(torch.as_tensor(value, dtype=torch.float).detach().reshape(()))

    # ------------------------------------------------------------------ step 7
    def on_train_epoch_end(self) -> None:
        iteration = self.current_epoch
        metrics = dict(self.iter_metrics)
        for key, values in self.stats.items():
            metrics[key] = _gmean(torch.stack(values))
        # The KL the controller sees is the KL that was used (and logged as kl/value).
        kl_used = metrics["kl/value"]
        self.c.kl_controller.update(kl_used, self.episodes * self.trainer.world_size)
        metrics["kl/coef_next"] = float(self.c.kl_controller.coef)
        for phase, secs in self.timer.pop().items():
            metrics[f"time/{phase}_s"] = secs
        every = self.eval_cfg.every
        if every and ((iteration + 1) % every == 0 or iteration + 1 == self.rl.iterations):
            with self.timer("eval"):
                self.last_eval = self.periodic_eval()
            metrics.update(self.last_eval)
            metrics.update({f"time/{k}_s": v for k, v in self.timer.pop().items()})
        metrics["iteration"] = iteration
        metrics["episodes"] = (iteration + 1) * self.episodes * self.trainer.world_size
        self.log_dict(
            {k: float(v) for k, v in metrics.items()}, on_step=False, on_epoch=True, sync_dist=False
        )
        self.exp = None

    @torch.no_grad()
    def periodic_eval(self) -> dict[str, float]:
        """The evaluation of the eval stage on ``eval.n_prompts_during`` held-out prompts."""
        cfg, c = self.eval_cfg, self.c
        world, rank = self.trainer.world_size, self.trainer.global_rank
        prompts = self.eval_prompts[: cfg.n_prompts_during][rank::world]
        totals: dict[str, Tensor] = {}
        torch.manual_seed(self.recipe.seed * 13 + self.current_epoch)
        max_new = cfg.max_new_tokens or self.rollout.max_new_tokens
        for lo in range(0, len(prompts), cfg.batch_size):
            chunk = prompts[lo : lo + cfg.batch_size]
            stats = eval_batch(
                c.policy, c.reference, Judges(c.task.gold, c.reward), chunk, tokenizer=c.policy.tokenizer,
                temperature=cfg.temperature, max_new_tokens=max_new, greedy=False,
            )  # fmt: skip
            for key in SUMMARY_NAMES:
                if key in stats:
                    totals[key] = totals.get(key, torch.zeros(2)) + torch.stack(
                        [stats[key].sum(), torch.tensor(float(len(chunk)))]
                    )
        self.policy_net.train()
        return {
            SUMMARY_NAMES[k]: float(all_reduce_sum(v)[0] / all_reduce_sum(v)[1].clamp_min(1))
            for k, v in totals.items()
        }

    # ------------------------------------------------------------------ checkpoint state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state: dict[str, Any] = {"kl_controller": self.c.kl_controller.state_dict()}
        state["transforms"] = [
            t.state_dict() if hasattr(t, "state_dict") else None for _, t in self.c.transforms
        ]
        checkpoint["instructrl"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("instructrl", {})
        if "kl_controller" in state:
            self.c.kl_controller.load_state_dict(state["kl_controller"])
        for (_, t), s in zip(self.c.transforms, state.get("transforms", [])):
            if s is not None and hasattr(t, "load_state_dict"):
                t.load_state_dict(s)


def _gmean(x: Tensor) -> float:
    """Mean of a 1-D tensor over all processes."""
    x = x.detach().float().reshape(-1)
    if not distributed():
        return float(x.mean()) if x.numel() else float("nan")
    s = all_reduce_sum(torch.stack([x.sum(), torch.tensor(float(x.numel()), device=x.device)]))
    return float(s[0] / s[1].clamp_min(1.0))


class RLStage:
    """PPO / PPO-ptx (and the registered alternatives) against the reward model."""

    name = "rl"
    reads = ()
    cacheable = False

    def describe(self, recipe: Recipe) -> dict[str, Any]:
        ro, rl = recipe.section("rollout"), recipe.section("rl")
        k = samples_per_prompt(recipe)
        devices = recipe.cfg.trainer.get("devices", 1)
        devices = devices if isinstance(devices, int) and devices > 0 else 1
        per_iter = ro.prompts_per_iteration * k
        adv = recipe.choice("advantage")
        est = recipe.registry.build("advantage", adv.name, adv.config, _bare(recipe))
        out = {
            "processes": devices,
            "samples_per_prompt": k,
            "episodes_per_iteration": f"{ro.prompts_per_iteration} prompts × {k} samples × {devices} processes = {per_iter * devices}",
            "minibatch": f"{per_iter} / {rl.minibatches} = {per_iter // rl.minibatches} sequences per process",
            "micro_batch": rl.micro_batch_size or per_iter // rl.minibatches,
            "optimizer_steps_per_iteration": rl.epochs * rl.minibatches,
            "total_episodes": rl.iterations * per_iter * devices,
            "total_optimizer_steps": rl.iterations * rl.epochs * rl.minibatches,
            "value_model": "yes (value block used)"
            if est.needs_values
            else f"none: '{adv.name}' is critic-free, the value block is ignored",
            "kl": f"{recipe.choice('kl.estimator').name} in the {recipe.section('kl').placement}, controller {recipe.choice('kl.controller').name}",
            "extra_losses": ", ".join(
                f"{c.name} (coef {getattr(c.config, 'coef', '?')})" for c in recipe.extra_losses
            )
            or "none",
        }
        return out

    def run(self, ctx: StageContext) -> dict[str, Any]:
        recipe = ctx.recipe
        rl = recipe.section("rl")
        seed_everything(recipe.seed)
        comps = build_components(ctx)
        eval_prompts = list(comps.task.prompts("eval"))
        module = RLModule(recipe, comps, eval_prompts)
        ckpt_dir = ctx.stage_dir / "checkpoints"
        checkpoint = ModelCheckpoint(
            dirpath=str(ckpt_dir),
            filename="iter-{epoch}",
            every_n_epochs=rl.checkpoint_every,
            save_top_k=1,
            save_last=True,
            monitor=None,
        )
        trainer = make_trainer(
            ctx,
            callbacks=[checkpoint],
            max_epochs=rl.iterations,
            use_distributed_sampler=False,
            enable_checkpointing=True,
        )
        ckpt_path = str(ckpt_dir / "last.ckpt") if ctx.resume and (ckpt_dir / "last.ckpt").exists() else None
        fit(trainer, module, ckpt_path=ckpt_path)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if is_global_zero():
            comps.policy.save(str(ctx.model_dir))
        trainer.strategy.barrier()
        keep = ("reward/", "kl/", "policy/", "value/", "response/", "ptx/", "advantage/")
        summary = {
            f"rl/{k}" if not k.startswith("eval/") else k: v for k, v in metrics.items() if k.startswith(keep)
        }
        summary["rl/iterations"] = rl.iterations
        summary["rl/episodes"] = int(metrics.get("episodes", 0))
        if math.isnan(summary.get("rl/reward/raw", 0.0)):
            raise RunFailure("rl: the reward became NaN")
        write_json(ctx.stage_dir / "summary.json", summary)
        return summary


def _bare(recipe: Recipe) -> Any:
    from ..registry import BuildContext

    return BuildContext(registry=recipe.registry, seed=recipe.seed)
