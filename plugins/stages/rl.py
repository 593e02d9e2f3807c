"""The **rl** stage: PPO (and its alternatives) against a reward model, as one LightningModule with
manual optimisation. The iteration itself is in ``rl_step.py``; here are its recipe sections, the
building of the components, and the Lightning glue.

One Lightning *epoch* is one RL iteration: ``on_train_epoch_start`` runs steps 1–5
(:func:`~.rl_step.experience`), each ``training_step`` runs step 6 on one micro-batch
(:func:`~.rl_step.micro_batch_loss`; the last micro-batch of a minibatch steps the optimisers) and
``on_train_epoch_end`` step 7 (log; update the KL controller; periodic evaluation). Each
``training_step`` is one forward and one backward through Lightning's strategy wrapper, so DDP (and
FSDP2) synchronise gradients the way they expect; every whitening statistic is global across
processes (``core.ops``).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from instructrl.core.config import Choice, Recipe
from instructrl.core.errors import ConfigError, RunFailure
from instructrl.core.fields import non_negative, param, positive, to_plain
from instructrl.core.hookspecs import hookimpl
from instructrl.core.io import is_global_zero, write_json
from instructrl.core.ops import all_reduce_sum, global_mean
from instructrl.core.protocols import (
    AdvantageEstimator,
    ExtraLoss,
    KLController,
    KLEstimator,
    Objective,
    Policy,
    RewardModel,
    RewardTransform,
    Stateful,
    Task,
    ValueModel,
)
from instructrl.core.training import CHECKPOINT_SUBDIR, StageContext, devices
from instructrl.core.types import Completion, ControllerInput, Prompt, TokenBatch
from instructrl.plugins.stages.common import (
    StageCheckpoint,
    Timer,
    check_sequence_fits,
    first_non_finite,
    fit,
    make_trainer,
    resume_path,
    sample_completions,
    score_completions,
    seed_everything,
)
from torch import Tensor
from torch.utils.data import DataLoader

from . import rl_step
from .evaluate import (
    EvalSection,
    Judges,
    against,
    eval_batch,
    lm_loss_on,
    load_policy_dir,
    rl_start,
    summary_name,
)
from .rl_step import Experience, MicroStep


@dataclass
class RolloutSection:
    """``rollout``: how responses are sampled in RL."""

    prompts_per_iteration: int = param(64, "Prompts sampled per PPO iteration (per process).")
    samples_per_prompt: int | None = param(
        None, "Responses per prompt; null = the advantage estimator's default (gae 1, group estimators 4)."
    )
    temperature: float = param(1.0, "Sampling temperature; logprobs are computed at the same temperature.")
    max_new_tokens: int = param(32, "Response token budget; a response without EOS is truncated.")
    max_prompt_tokens: int = param(
        128, "Prompts longer than this keep their last tokens (RL, reward-model rankings, evaluation)."
    )

    def __post_init__(self) -> None:
        positive(self, "prompts_per_iteration", "temperature", "max_new_tokens", "max_prompt_tokens")
        if self.samples_per_prompt is not None and self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1 or null (got {self.samples_per_prompt})")


@dataclass
class RLSection:
    """``rl``: the optimisation loop of the RL stage."""

    iterations: int = param(
        150, "PPO iterations (rollout → optimise); a --resume may raise it.", resume_safe=True
    )
    epochs: int = param(4, "Optimisation epochs over each iteration's rollouts (lm-human-preferences: 4).")
    minibatches: int = param(4, "Minibatches per epoch; each is one optimiser step.")
    micro_batch_size: int | None = param(
        None,
        "Split each minibatch into micro-batches of this many sequences (gradient accumulation); null = no split.",
    )
    max_micro_batch_size: int | None = param(
        32,
        "With micro_batch_size null: at most this many sequences per forward/backward; a larger minibatch is cut "
        "into the fewest equal micro-batches within it (bounds the activation memory); null = no cap.",
    )
    lr: float = param(1e-4, "Policy learning rate (AdamW, constant after warmup).")
    warmup_iterations: int = param(0, "Linear learning-rate warmup, in iterations.")
    weight_decay: float = param(0.0, "AdamW weight decay (policy and value).")
    grad_clip: float | None = param(
        1.0, "Max gradient norm (policy and value separately); null = no clipping."
    )
    entropy_coef: float = param(0.0, "Entropy bonus coefficient (subtracted from the policy loss).")
    checkpoint_every: int = param(25, "Save a checkpoint every N iterations (and at the end).")
    check_ratio: bool = param(
        True, "Assert ratio == 1 and approx-KL == 0 on the first minibatch of every iteration."
    )

    def __post_init__(self) -> None:
        positive(self, "iterations", "epochs", "minibatches", "lr", "checkpoint_every")
        non_negative(self, "warmup_iterations", "weight_decay")
        for key in ("micro_batch_size", "max_micro_batch_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 or null (got {getattr(self, key)})")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or null (got {self.grad_clip})")
        if self.entropy_coef < 0:
            raise ValueError(f"entropy_coef must be >= 0 (got {self.entropy_coef})")


@dataclass
class RLComponents:
    """Every component the RL stage builds from the recipe, typed by its protocol."""

    task: Task
    policy: Policy
    reference: Policy
    value: ValueModel | None
    reward: RewardModel
    transforms: list[tuple[str, RewardTransform]]
    kl_estimator: KLEstimator
    kl_controller: KLController
    advantage: AdvantageEstimator
    objective: Objective
    extra_losses: list[tuple[str, ExtraLoss]]


@dataclass(frozen=True)
class Settings:
    """What the iteration reads from the recipe, flat (no config object inside the maths)."""

    samples_per_prompt: int
    temperature: float
    max_new_tokens: int
    max_prompt_tokens: int
    kl_in_reward: bool
    needs_logits: bool
    greedy_baseline: bool
    iterations: int
    epochs: int
    minibatches: int
    micro_batch_size: int | None
    entropy_coef: float
    value_coef: float
    value_clip: float | None
    check_ratio: bool
    seed: int
    kl_active: bool = True  # False: no KL term (fixed coef 0), so no reference forward
    # on-policy (1 epoch × 1 minibatch) in fp32 without full logits: the sampler's logprobs are the old
    # logprobs (no separate forward); the ratio == 1 check then compares training with the sampler
    old_from_rollout: bool = False


def evaluates_after(done: int, cfg: EvalSection, iterations: int) -> bool:
    """Whether the periodic evaluation runs after ``done`` RL iterations: every ``eval.every``, at
    each of ``eval.at``, and at the end when either is set."""
    periodic = bool(cfg.every or cfg.at)
    return bool((cfg.every and done % cfg.every == 0) or done in cfg.at or (periodic and done == iterations))


def micro_batch_rows(minibatch: int, micro_batch_size: int | None, cap: int | None) -> int:
    """Sequences per micro-batch: ``micro_batch_size`` when set; else the whole ``minibatch`` when it
    is within ``cap`` (or there is no cap); else ``minibatch / k`` for the smallest ``k`` that
    divides it and brings it within ``cap`` (1 when nothing does)."""
    if micro_batch_size is not None:
        return micro_batch_size
    if cap is None or minibatch <= cap:
        return minibatch
    return next(
        minibatch // k for k in range(2, minibatch + 1) if minibatch % k == 0 and minibatch // k <= cap
    )


def settings(recipe: Recipe) -> Settings:
    """The flat settings the iteration reads."""
    ro, rl, value = recipe.section("rollout"), recipe.section("rl"), recipe.section("value")
    d = recipe.derived
    minibatch = ro.prompts_per_iteration * d.samples_per_prompt // rl.minibatches
    return Settings(
        samples_per_prompt=d.samples_per_prompt, temperature=ro.temperature, max_new_tokens=ro.max_new_tokens,
        max_prompt_tokens=ro.max_prompt_tokens, kl_in_reward=recipe.section("kl").placement == "reward",
        needs_logits=d.needs_logits, greedy_baseline=d.greedy_baseline, iterations=rl.iterations,
        epochs=rl.epochs, minibatches=rl.minibatches, micro_batch_size=micro_batch_rows(minibatch, rl.micro_batch_size, rl.max_micro_batch_size),
        entropy_coef=rl.entropy_coef, value_coef=value.coef, value_clip=value.clip,
        check_ratio=rl.check_ratio, seed=recipe.seed, kl_active=d.kl_active,
        old_from_rollout=rl.epochs == 1 and rl.minibatches == 1 and not d.needs_logits and d.precision == "32",
    )  # fmt: skip


def build_components(ctx: StageContext) -> tuple[RLComponents, list[tuple[str, Stateful]]]:
    """Build every RL component through the registry, in dependency order; and the stateful ones
    (KL controller, and each component declaring ``Needs(stateful=True)``) by checkpoint key."""
    recipe = ctx.recipe
    s = settings(recipe)
    task = ctx.build("task")
    policy = ctx.build("policy")
    tok = policy.tokenizer
    reference = policy.reference()
    value = ctx.build("value", tokenizer=tok) if recipe.derived.needs_values else None
    reward = ctx.build("reward", task=task, tokenizer=tok)
    max_response = s.max_new_tokens + 1

    def score_demonstrations() -> Tensor:
        demos = list(task.demonstrations())
        comps = [Completion(d.response, True) for d in demos]
        prompts = [d.prompt for d in demos]
        return score_completions(
            reward, tok, prompts, comps, max_prompt=s.max_prompt_tokens, max_response=max_response
        )

    def score_reference_samples(n: int) -> Tensor:
        return reference_sample_scores(task, reference, reward, n, s)

    calib = {"score_demonstrations": score_demonstrations, "score_reference_samples": score_reference_samples}
    reg = recipe.registry
    transforms = [
        (c.name, reg.build(c.kind, c.name, c.config, ctx.build_context(task=task, tokenizer=tok, reward_model=reward, **calib)))
        for c in recipe.transforms
    ]  # fmt: skip
    extra = [
        (c.name, reg.build(c.kind, c.name, c.config, ctx.build_context(task=task, tokenizer=tok)))
        for c in recipe.extra_losses
    ]
    comps = RLComponents(
        task, policy, reference, value, reward, transforms, ctx.build("kl.estimator"), ctx.build("kl.controller"),
        ctx.build("advantage"), ctx.build("objective"), extra,
    )  # fmt: skip
    # Checkpointed state: the KL controller always, and every component declaring Needs(stateful=True),
    # keyed by kind and recipe position (recipe.derived.stateful lists the same for --dry-run).
    ch = recipe.choice
    pairs: list[tuple[Choice, object]] = [
        (ch("task"), task), (ch("policy"), policy), (ch("value"), value), (ch("reward"), reward),
        (ch("kl.estimator"), comps.kl_estimator), (ch("advantage"), comps.advantage), (ch("objective"), comps.objective),
        *zip(recipe.transforms, [t for _, t in transforms]), *zip(recipe.extra_losses, [e for _, e in extra]),
    ]  # fmt: skip
    stateful: list[tuple[str, Stateful]] = [("kl_controller", comps.kl_controller)]
    stateful += [(f"{c.kind}@{c.path}", obj) for c, obj in pairs if obj is not None and reg.needs(c.kind, c.name).stateful]  # type: ignore[misc]  # fmt: skip
    return comps, stateful


@torch.no_grad()
def reference_sample_scores(
    task: Task, reference: Policy, reward: RewardModel, n: int, s: Settings
) -> Tensor:
    """``(n,)`` reward-model scores of reference-policy samples on RL prompts (for ``gain_bias``)."""
    prompts = list(task.prompts("rl"))
    rng = random.Random(s.seed + 7919)
    chosen = [prompts[rng.randrange(len(prompts))] for _ in range(n)]
    torch.manual_seed(s.seed + 7919)
    comps = sample_completions(
        reference, chosen, max_prompt=s.max_prompt_tokens, max_new_tokens=s.max_new_tokens,
        temperature=s.temperature, batch_size=128,
    )  # fmt: skip
    return score_completions(
        reward,
        reference.tokenizer,
        chosen,
        comps,
        max_prompt=s.max_prompt_tokens,
        max_response=s.max_new_tokens + 1,
    )


def iteration_prompts(
    prompts: list[Prompt], n: int, iteration: int, seed: int, world: int, rank: int
) -> list[Prompt]:
    """This process's ``n`` prompts for ``iteration``: a seeded shuffle of ``prompts``, cycled."""
    per_pass = max(1, len(prompts) // (n * world))
    pass_idx, slot = divmod(iteration, per_pass)
    order = list(range(len(prompts)))
    random.Random(seed * 1_000_003 + pass_idx).shuffle(order)
    start = (slot * world + rank) * n
    return [prompts[order[(start + i) % len(order)]] for i in range(n)]


def grad_norm(opt: torch.optim.Optimizer) -> Tensor:
    """The total 2-norm of the gradients of ``opt``'s parameters (0 without any)."""
    opt = getattr(opt, "optimizer", opt)  # Lightning's LightningOptimizer wraps the torch optimiser
    grads = [p.grad.detach() for group in opt.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6 (handles FSDP2 DTensor gradients)
        total = torch.nn.utils.get_total_norm(grads)
    else:
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return total.full_tensor() if hasattr(total, "full_tensor") else total


def log_epoch_metrics(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """What ``log_dict(metrics, on_epoch=True)`` in ``on_train_epoch_end`` leads to — every logger
    gets the row with ``epoch`` at Lightning's step, ``trainer.callback_metrics`` the values —
    without its per-key bookkeeping (~0.5 ms a key: 20 ms an iteration, 15% of a small model's step)."""
    # Lightning logs epoch-end metrics at the step of the epoch's last batch (its counter minus one)
    step = max(0, getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step + 1) - 1)
    values = {k: torch.tensor(v, dtype=torch.float32) for k, v in metrics.items()}  # as log_dict stores them
    trainer.callback_metrics.update(values)
    row = {**{k: float(v) for k, v in values.items()}, "epoch": trainer.current_epoch}
    for logger in trainer.loggers:
        logger.log_metrics(row, step=step)
        logger.save()


def last_good_checkpoint(trainer: pl.Trainer) -> str:
    """``<stage dir>/checkpoints/last.ckpt`` if it exists, else ``"no checkpoint yet"``."""
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    last = Path(dirpath) / "last.ckpt" if dirpath else None
    return str(last) if last is not None and last.is_file() else "no checkpoint yet"


def plain_state(value: object, where: str) -> object:
    """``value`` as what ``torch.load(weights_only=True)`` reads: tensors, numbers, strings, bools,
    None, and lists / tuples / dicts of them (numpy scalars become numbers); anything else is a
    :class:`RunFailure` naming the component whose ``state_dict`` returned it."""
    if value is None or isinstance(value, (Tensor, bool, int, float, str, bytes)):
        return value
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, int) else k: plain_state(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [plain_state(v, where) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalar
        return value.item()
    raise RunFailure(
        f"rl: the state_dict of {where} holds a {type(value).__name__}; checkpoints hold only tensors and plain data"
    )


def experience_state(exp: Experience) -> dict[str, object]:
    """An iteration's :class:`Experience` as checkpoint data (the TokenBatch as a list)."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(exp):
        v = getattr(exp, f.name)
        out[f.name] = list(v) if isinstance(v, TokenBatch) else plain_state(v, "the iteration's rollouts")
    return out


def experience_from_state(state: dict[str, object]) -> Experience:
    """Inverse of :func:`experience_state`."""
    kw = dict(state)
    kw["batch"] = TokenBatch(*kw["batch"])  # type: ignore[misc]
    return Experience(**kw)  # type: ignore[arg-type]


class RLModule(pl.LightningModule):
    """PPO-style RL with swappable components; see the module docstring for the loop layout."""

    def __init__(self, recipe: Recipe, comps: RLComponents, stateful: list[tuple[str, Stateful]]) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.comps, self.stateful, self.s = comps, stateful, settings(recipe)
        self.rl, self.value_cfg, self.eval_cfg = (
            recipe.section("rl"),
            recipe.section("value"),
            recipe.section("eval"),
        )
        self.prompts_per_iteration = recipe.section("rollout").prompts_per_iteration
        self.episodes = self.prompts_per_iteration * self.s.samples_per_prompt
        # Trained modules are registered (optimised, checkpointed, wrapped by the strategy);
        # the reference and the reward model stay outside the module tree (frozen, not saved).
        self.policy_net = comps.policy.model
        self.value_net = comps.value.model if comps.value is not None else None
        self.rl_prompts = list(comps.task.prompts("rl"))
        self.eval_prompts = list(comps.task.prompts("eval"))
        if not self.rl_prompts:
            raise ConfigError("task: no RL prompts (task.prompts('rl') is empty)")
        self.timer = Timer()
        # the periodic evaluation's baseline when it is not the KL reference (eval.against: the SFT
        # model, the policy starting from the RL init), and its held-out pretraining text
        self.baseline: Policy | None = None
        self.eval_docs: list[str] = []
        self.exp: Experience | None = None
        self.plan: list[MicroStep] = []

    # ------------------------------------------------------------------ Lightning glue
    def configure_optimizers(
        self,
    ) -> tuple[list[torch.optim.Optimizer], list[torch.optim.lr_scheduler.LRScheduler]]:
        nets = [(self.policy_net, self.rl.lr)] + (
            [(self.value_net, self.value_cfg.lr)] if self.value_net else []
        )
        opts = [
            torch.optim.AdamW(n.parameters(), lr=lr, weight_decay=self.rl.weight_decay, eps=1e-5)
            for n, lr in nets
        ]
        warm = self.rl.warmup_iterations * self.rl.epochs * self.rl.minibatches
        lam = (lambda step: min(1.0, (step + 1) / warm)) if warm else (lambda step: 1.0)
        return opts, [torch.optim.lr_scheduler.LambdaLR(o, lam) for o in opts]

    def train_dataloader(self) -> DataLoader:
        n = self.rl.epochs * len(rl_step.update_plan(self.episodes, self.s, 0)) // self.rl.epochs
        return DataLoader(range(n), batch_size=None, shuffle=False)

    def on_fit_start(self) -> None:
        # Dropout is off in every trained model (InstructGPT PPO), so train mode changes nothing
        # numerically; it keeps the modules in the mode Lightning expects.
        self.policy_net.train()
        if self.value_net is not None:
            self.value_net.train()

    @property
    def precision_name(self) -> str:
        return "bf16" if "16" in str(self.trainer.precision) else "fp32"

    def on_train_epoch_start(self) -> None:
        it, world, rank = self.current_epoch, self.trainer.world_size, self.trainer.global_rank
        prompts = iteration_prompts(self.rl_prompts, self.prompts_per_iteration, it, self.s.seed, world, rank)
        with self.trainer.precision_plugin.forward_context():
            self.exp = rl_step.experience(self.comps, self.s, prompts, it, rank, self.timer)
        self.plan = rl_step.update_plan(self.episodes, self.s, it)

    def training_step(self, index: int, batch_idx: int) -> None:
        assert self.exp is not None
        step = self.plan[int(index)]
        with self.timer("train"):
            loss = rl_step.micro_batch_loss(self.comps, self.s, self.exp, step, self.current_epoch, self.global_step, self.precision_name)  # fmt: skip
            self.manual_backward(loss)
            if step.last:
                self.step_optimizers()

    def step_optimizers(self) -> None:
        """The numerical guard, then clip and step every optimiser. The guard reads the iteration's
        rewards / advantages / returns flags, the micro-batch losses' flag and each model's gradient
        norm (before clipping, also with ``rl.grad_clip: null``): nothing non-finite reaches the weights."""
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        scheds = self.lr_schedulers()
        flags = dict(self.exp.finite) if self.exp is not None else {}
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None  # fp16: skips inf steps
        if not scaled:
            for name, opt in zip(("policy", "value"), opts):  # configure_optimizers' order
                flags[f"{name} gradient norm"] = torch.isfinite(grad_norm(opt))
        self.check_finite(flags)
        for opt in opts:
            if self.rl.grad_clip is not None:
                self.clip_gradients(opt, gradient_clip_val=self.rl.grad_clip, gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad(set_to_none=True)
        for sched in scheds if isinstance(scheds, list) else [scheds]:
            sched.step()

    def check_finite(self, flags: dict[str, Tensor]) -> None:
        """A :class:`RunFailure` naming the first non-finite quantity (on any process), the iteration
        and the last good checkpoint; one all-reduce and one host sync. Raised inside the training
        step, so Lightning's ModelCheckpoint (``save_on_exception`` off) writes nothing after it."""
        bad = first_non_finite(flags)
        if bad is not None:
            raise RunFailure(
                f"rl: non-finite {bad} at iteration {self.current_epoch} "
                f"(last good checkpoint: {last_good_checkpoint(self.trainer)})"
            )

    def on_train_epoch_end(self) -> None:
        assert self.exp is not None
        log_epoch_metrics(self.trainer, self.iteration_metrics(self.exp))
        self.exp = None

    # ------------------------------------------------------------------ step 7
    def iteration_metrics(self, exp: Experience) -> dict[str, float]:
        """Everything the iteration logs; the KL controller observes the KL that was used."""
        it = self.current_epoch
        m = dict(exp.metrics)
        m.update({k: global_mean(torch.stack(v)) for k, v in exp.stats.items()})
        n_episodes = self.episodes * self.trainer.world_size
        self.comps.kl_controller.update(
            ControllerInput(
                kl=exp.kl, mean_kl=m["kl/value"], scores=exp.scores, n_episodes=n_episodes,
                iteration=it, iterations=self.rl.iterations,
            )
        )  # fmt: skip
        m["kl/coef_next"] = float(self.comps.kl_controller.coef)
        if evaluates_after(it + 1, self.eval_cfg, self.rl.iterations):
            with self.timer("eval"):
                m.update(self.periodic_eval())
        m.update({f"time/{phase}_s": secs for phase, secs in self.timer.pop().items()})
        m["iteration"] = it
        m["episodes"] = (it + 1) * n_episodes
        return {k: float(v) for k, v in m.items()}

    @torch.no_grad()
    def periodic_eval(self) -> dict[str, float]:
        """The evaluation of the eval stage on ``eval.n_prompts_during`` held-out prompts."""
        cfg, c, s = self.eval_cfg, self.comps, self.s
        world, rank = self.trainer.world_size, self.trainer.global_rank
        prompts = self.eval_prompts[: cfg.n_prompts_during][rank::world]
        totals: dict[str, Tensor] = {}
        torch.manual_seed(s.seed * 13 + self.current_epoch)
        for lo in range(0, len(prompts), cfg.batch_size):
            chunk = prompts[lo : lo + cfg.batch_size]
            stats, _, _ = eval_batch(
                c.policy, self.baseline or c.reference, Judges(c.task.gold, c.reward), chunk, temperature=cfg.temperature,
                max_new_tokens=cfg.max_new_tokens or s.max_new_tokens, greedy=False, max_prompt=s.max_prompt_tokens,
                kl_reference=c.reference if self.baseline is not None else None,
            )  # fmt: skip
            for key in stats:
                if summary_name(key) is not None:
                    add = torch.stack([stats[key].sum(), torch.tensor(float(len(chunk)))])
                    totals[key] = totals.get(key, torch.zeros(2)) + add
        sums = {k: all_reduce_sum(v) for k, v in totals.items()}
        out = {str(summary_name(k)): float(v[0] / v[1].clamp_min(1)) for k, v in sums.items()}
        if "eval/kl_to_ref" not in out:  # the baseline is the KL reference
            out["eval/kl_to_ref"] = out["eval/kl_to_sft"]
        if self.eval_docs:  # the alignment tax along the run (same documents as the eval stage)
            out["eval/pretrain_loss"] = lm_loss_on(c.policy, self.eval_docs)
        self.policy_net.train()
        return out

    # ------------------------------------------------------------------ checkpoint state
    def on_save_checkpoint(self, checkpoint: dict[str, object]) -> None:
        """Every stateful component's state (KL controller, ptx generator …) as plain data; taken in
        the middle of an iteration (a stop on a signal, always after an optimiser step), also the
        iteration's rollouts and how many of its micro-steps are done."""
        checkpoint["instructrl"] = {key: plain_state(comp.state_dict(), key) for key, comp in self.stateful}
        if self.exp is not None:
            done = int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)
            checkpoint["instructrl_iteration"] = {
                "micro_steps_done": done,
                "experience": experience_state(self.exp),
            }

    def on_load_checkpoint(self, checkpoint: dict[str, object]) -> None:
        state = checkpoint.get("instructrl", {})
        assert isinstance(state, dict)
        for key, comp in self.stateful:
            if key in state:
                comp.load_state_dict(state[key])
        partial = checkpoint.get("instructrl_iteration")
        if isinstance(partial, dict):  # Lightning restarts mid-epoch without on_train_epoch_start
            self.exp = experience_from_state(partial["experience"])
            # the loader restarts at index 0 and Lightning runs the remaining micro-steps: shift the plan
            it = int(checkpoint["epoch"])  # type: ignore[call-overload]
            self.plan = rl_step.update_plan(self.episodes, self.s, it)[int(partial["micro_steps_done"]) :]


class RLStage:
    """PPO / PPO-ptx (and the registered alternatives) against the reward model."""

    sections = {"rollout": RolloutSection, "rl": RLSection}

    def inputs(self, recipe: Recipe) -> dict[str, object]:
        cfg = recipe.plain()
        keys = ["policy", "reward"] + (["value"] if recipe.derived.needs_values else [])
        baseline = (
            {"eval.against": against(recipe)}
            if (recipe.section("eval").every or recipe.section("eval").at) and rl_start(recipe) is not None
            else {}
        )
        return {k: cfg[k] for k in keys} | {c.name: cfg[c.name] for c in recipe.extra_losses} | baseline

    def cache_key(self, recipe: Recipe) -> None:
        return None

    def skip(self, recipe: Recipe) -> tuple[str, str] | None:
        return None

    def check(self, recipe: Recipe) -> None:
        check_sequence_fits(recipe)
        rl = recipe.section("rl")
        per_iter = recipe.section("rollout").prompts_per_iteration * recipe.derived.samples_per_prompt
        if per_iter % rl.minibatches:
            raise ConfigError(
                f"rl.minibatches: must divide the episodes per iteration (prompts_per_iteration × samples_per_prompt = "
                f"{per_iter}; got minibatches={rl.minibatches})"
            )
        mb = per_iter // rl.minibatches
        if rl.micro_batch_size is not None and mb % rl.micro_batch_size:
            raise ConfigError(
                f"rl.micro_batch_size: must divide the minibatch size {mb} (got {rl.micro_batch_size})"
            )

    def describe(self, recipe: Recipe) -> dict[str, object]:
        ro, rl, d = recipe.section("rollout"), recipe.section("rl"), recipe.derived
        n, k = devices(recipe), d.samples_per_prompt
        per_iter = ro.prompts_per_iteration * k
        adv = recipe.choice("advantage").name
        return {
            "processes": n,
            "samples_per_prompt": k,
            "episodes_per_iteration": f"{ro.prompts_per_iteration} prompts × {k} samples × {n} processes = {per_iter * n}",
            "minibatch": f"{per_iter} / {rl.minibatches} = {per_iter // rl.minibatches} sequences per process",
            "micro_batch": micro_batch_rows(per_iter // rl.minibatches, rl.micro_batch_size, rl.max_micro_batch_size),
            "optimizer_steps_per_iteration": rl.epochs * rl.minibatches,
            "total_episodes": rl.iterations * per_iter * n,
            "total_optimizer_steps": rl.iterations * rl.epochs * rl.minibatches,
            "value_model": "yes (value block used)" if d.needs_values else f"none: '{adv}' is critic-free, the value block is ignored",
            "greedy_baseline": d.greedy_baseline,
            "kl": f"{recipe.choice('kl.estimator').name} in the {recipe.section('kl').placement}, controller {recipe.choice('kl.controller').name}"
            + (" (full logits)" if d.needs_logits else ""),
            "extra_losses": ", ".join(f"{c.name} ({to_plain(c.config)})" for c in recipe.extra_losses) or "none",
            "checkpointed_state": ", ".join(f"{kind} '{name}'" for kind, name, _ in d.stateful) or "kl controller only",
        }  # fmt: skip

    def run(self, ctx: StageContext) -> dict[str, object]:
        recipe = ctx.recipe
        rl = recipe.section("rl")
        seed_everything(recipe.seed)
        comps, stateful = build_components(ctx)
        module = RLModule(recipe, comps, stateful)
        eval_cfg = recipe.section("eval")
        if eval_cfg.every or eval_cfg.at:
            if rl_start(recipe) is not None:  # win rates along the run against the eval stage's baseline
                module.baseline = load_policy_dir(
                    ctx, ctx.resolve(against(recipe), "eval.against"), "eval.against"
                )
            module.eval_docs = list(comps.task.pretraining_text("eval"))[: eval_cfg.pretrain_docs]
        # every checkpoint_every iterations, at the end, and after the optimiser step a signal stops at
        checkpoint = StageCheckpoint(
            ctx.stage_dir / CHECKPOINT_SUBDIR, ctx.name, every_n_epochs=rl.checkpoint_every
        )
        trainer = make_trainer(
            ctx, checkpoint=checkpoint, max_epochs=rl.iterations, use_distributed_sampler=False
        )
        metrics = fit(trainer, module, ckpt_path=resume_path(ctx))
        if is_global_zero():
            comps.policy.save(str(ctx.model_dir))
        trainer.strategy.barrier()
        keep = (
            "reward/",
            "kl/",
            "policy/",
            "value/",
            "response/",
            "advantage/",
            *(f"{n}/" for n, _ in comps.extra_losses),
        )
        summary: dict[str, object] = {
            f"rl/{k}" if not k.startswith("eval/") else k: v for k, v in metrics.items() if k.startswith(keep)
        }
        summary["rl/iterations"] = rl.iterations
        summary["rl/episodes"] = int(metrics.get("episodes", 0))
        if math.isnan(float(metrics.get("reward/raw", 0.0))):
            raise RunFailure("rl: the reward became NaN")
        write_json(ctx.stage_dir / "summary.json", summary)
        return summary


@hookimpl
def register_stages(register: Callable[..., None]) -> None:
    register("rl", RLStage())
