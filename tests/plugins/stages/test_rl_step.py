"""Step 6 of the RL iteration is exact under gradient accumulation: splitting a minibatch into
micro-batches gives the whole minibatch's gradient (objective, KL loss, entropy bonus, value loss
and the ptx extra loss together)."""

from __future__ import annotations

import pytest
import torch
from instructrl.core.types import Prompt
from instructrl.plugins.extra_losses import PtxConfig, PtxLoss
from instructrl.plugins.hf import HFValueModel, load_policy
from instructrl.plugins.kl import FixedKL, kl_k3
from instructrl.plugins.models import load_scalar_head_model
from instructrl.plugins.objectives import PPOClip, PPOClipConfig
from instructrl.plugins.stages import rl_step
from instructrl.plugins.stages.common import encode_prompts
from instructrl.plugins.stages.rl import RLComponents, Settings


class K3:
    def __call__(self, inp):
        return kl_k3(inp.logprobs, inp.ref_logprobs)


def settings(micro: int | None, **kw) -> Settings:
    base = dict(
        samples_per_prompt=1, temperature=1.0, max_new_tokens=8, max_prompt_tokens=32, kl_in_reward=False,
        needs_logits=False, greedy_baseline=False, iterations=10, epochs=1, minibatches=1,
        micro_batch_size=micro, entropy_coef=0.01, value_coef=0.1, value_clip=0.2, check_ratio=False, seed=0,
    )  # fmt: skip
    base.update(kw)
    return Settings(**base)


@pytest.fixture(scope="module")
def parts(smoke_pipeline):
    run_dir, _ = smoke_pipeline
    policy = load_policy(str(run_dir / "sft" / "model"), "policy.model")
    value_net = load_scalar_head_model(
        str(run_dir / "rm" / "model"), "value.model", tokenizer=policy.tokenizer
    )
    return policy, HFValueModel(value_net, policy.tokenizer)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_micro_batched_gradient_equals_the_whole_minibatch_gradient(parts, aggregation):
    policy, value = parts
    torch.manual_seed(0)
    prompts = [Prompt(str(i), f"reverse: {'abcdef'[: 2 + i % 4]}\n") for i in range(8)]
    ids, mask = encode_prompts(policy.tokenizer, [p.text for p in prompts], 32)
    gen = policy.generate(ids, mask, max_new_tokens=8, temperature=1.0)
    batch, rmask = gen.batch, gen.batch.response_mask
    with torch.no_grad():
        lp = policy.forward(batch, temperature=1.0).logprobs
        v = value.values(batch)
    noise = lambda: torch.randn_like(lp) * 0.3 * rmask  # noqa: E731 — old ≠ current so the clip is active
    vocab = len(policy.tokenizer)
    ptx = PtxLoss(
        PtxConfig(coef=2.0, batch_size=4, seq_len=16), torch.randint(4, vocab, (20, 16)), seed=0, rank=0
    )
    start = ptx.state_dict()
    comps = RLComponents(
        task=None, policy=policy, reference=policy, value=value, reward=None, transforms=[],
        kl_estimator=K3(), kl_controller=FixedKL(0.05), advantage=None,
        objective=PPOClip(PPOClipConfig(aggregation=aggregation)), extra_losses=[("ptx", ptx)],
    )  # fmt: skip
    exp_args = dict(
        batch=batch, group_ids=torch.arange(8), old_logprobs=lp + noise(), ref_logprobs=lp + noise(),
        ref_logits=None, values=v + noise(), advantages=torch.randn_like(lp) * rmask,
        returns=torch.randn_like(lp) * rmask, scores=torch.zeros(8), kl=torch.zeros(8), metrics={},
    )  # fmt: skip
    params = [p for p in [*policy.model.parameters(), *value.model.parameters()] if p.requires_grad]

    def gradient(micro: int | None) -> list[torch.Tensor]:
        s = settings(micro)
        ptx.load_state_dict(start)  # the same pretraining rows for both runs
        exp = rl_step.Experience(**exp_args)
        plan = rl_step.update_plan(8, s, iteration=0)
        assert len(plan) == 8 // (micro or 8) and all(st.count == len(plan) for st in plan)
        for p in params:
            p.grad = None
        for step in plan:
            rl_step.micro_batch_loss(
                comps, s, exp, step, iteration=0, opt_step=0, precision="fp32"
            ).backward()
        return [p.grad.clone() for p in params]

    whole = gradient(None)
    assert sum(float(g.abs().sum()) for g in whole) > 0
    for micro in (2, 4):
        for a, b in zip(whole, gradient(micro)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_ratio_check_stops_a_mismatch_only_when_enforced():
    lp = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    ok = rl_step.check_ratio(lp, lp, mask, "fp32", 0)
    assert ok == {"invariant/ratio_dev": 0.0, "invariant/approx_kl": 0.0}
    with pytest.raises(Exception, match=r"ratio invariant violated on the first minibatch of iteration 4"):
        rl_step.check_ratio(lp + 0.1, lp, mask, "fp32", 4)
    # rl.check_ratio=false records the deviation without stopping: e^0.1 − 1 = 0.10517
    seen = rl_step.check_ratio(lp + 0.1, lp, mask, "fp32", 4, enforce=False)
    assert seen["invariant/ratio_dev"] == pytest.approx(0.1051709, rel=1e-5)


def test_update_plan_covers_every_row_once_per_epoch_in_minibatches_of_micro_batches():
    s = settings(2, epochs=3, minibatches=2)
    plan = rl_step.update_plan(8, s, iteration=5)
    assert len(plan) == 3 * 2 * 2 and plan[0].first and not any(st.first for st in plan[1:])
    for epoch in range(3):
        rows = torch.cat([st.rows for st in plan[epoch * 4 : (epoch + 1) * 4]])
        assert sorted(rows.tolist()) == list(range(8))
    assert [st.last for st in plan[:4]] == [False, True, False, True]
    assert torch.equal(plan[0].minibatch_rows, torch.cat([plan[0].rows, plan[1].rows]))
    again = rl_step.update_plan(8, s, iteration=5)
    assert all(torch.equal(a.rows, b.rows) for a, b in zip(plan, again))  # seeded by (seed, iteration)


@pytest.mark.parametrize(
    ("every", "at", "evaluated"),
    [
        (25, [], [25, 50, 60]),  # every 25 and the end (60)
        (0, [1, 2, 4, 8], [1, 2, 4, 8, 60]),  # log-spaced, and the end
        (20, [5], [5, 20, 40, 60]),
        (0, [], []),  # no periodic evaluation (the eval stage still runs at the end)
    ],
)
def test_the_periodic_evaluation_runs_every_n_at_the_listed_iterations_and_at_the_end(every, at, evaluated):
    from instructrl.plugins.stages.evaluate import EvalSection
    from instructrl.plugins.stages.rl import evaluates_after

    cfg = EvalSection(every=every, at=at)
    assert [n for n in range(1, 61) if evaluates_after(n, cfg, 60)] == evaluated


def test_eval_at_must_list_iterations():
    from instructrl.core.config import load_recipe
    from instructrl.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"eval.at must list RL iterations >= 1 \(got \[0, 4\]\)"):
        load_recipe("ppo", ["eval.at=[0,4]"], smoke=True)


@pytest.mark.parametrize(
    ("minibatch", "explicit", "cap", "rows"),
    [
        (64, None, 32, 32),  # 64 → 2 × 32
        (48, None, 32, 24),  # 48 → 2 × 24
        (96, None, 32, 32),  # 96 → 3 × 32
        (16, None, 32, 16),  # within the cap: no split
        (37, None, 32, 1),  # a prime above the cap: one sequence at a time
        (64, None, None, 64),  # no cap
        (64, 8, 32, 8),  # an explicit micro_batch_size wins
    ],
)
def test_micro_batch_rows_is_the_fewest_equal_cut_within_the_cap(minibatch, explicit, cap, rows):
    from instructrl.plugins.stages.rl import micro_batch_rows

    assert micro_batch_rows(minibatch, explicit, cap) == rows


def test_the_default_cap_splits_the_ppo_recipes_minibatch():
    from instructrl.core.config import load_recipe
    from instructrl.plugins.stages.rl import settings as rl_settings

    recipe = load_recipe("ppo", ["advantage.name=grpo", "rollout.samples_per_prompt=4"])
    assert recipe.section("rl").max_micro_batch_size == 32
    s = rl_settings(recipe)  # 64 prompts × 4 samples / 4 minibatches = 64 sequences per minibatch
    assert s.micro_batch_size == 32 and len(rl_step.update_plan(256, s, 0)) == 4 * 4 * 2
    off = rl_settings(
        load_recipe(
            "ppo", ["advantage.name=grpo", "rollout.samples_per_prompt=4", "rl.max_micro_batch_size=null"]
        )
    )
    assert off.micro_batch_size == 64
