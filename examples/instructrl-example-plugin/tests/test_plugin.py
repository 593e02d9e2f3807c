"""Tests a plugin author would write: the maths against hand values, and registration."""

import math

import pytest
import torch
from instructrl.core import plugin_api as api
from instructrl.core.registry import BuildContext, make_registry
from instructrl_example import plugin


@pytest.fixture(scope="module")
def registry():
    return make_registry([plugin], autoload=False)


def build(registry, kind, name, **keys):
    """Validate ``keys`` as the recipe would, then build the component."""
    config = registry.config_for_block(kind, name, keys, kind)
    return registry.build(kind, name, config, BuildContext(registry=registry))


# ---------------------------------------------------------------------------------- k3_clamped


def test_k3_clamped_by_hand():
    # Δ = 0 → 0;  Δ = 1 → e^-1 + 1 - 1 = 0.3679;  Δ = -5 → e^5 - 5 - 1 = 142.41 → clamped to 10
    lp = torch.tensor([[0.0, 1.0, -5.0]])
    out = plugin.k3_clamped(lp, torch.zeros_like(lp), max_value=10.0)
    torch.testing.assert_close(out, torch.tensor([[0.0, math.exp(-1), 10.0]]))


def test_k3_clamped_reads_a_kl_input(registry):
    est = build(registry, "kl_estimator", "k3_clamped", max_value=5.0)
    lp = torch.tensor([[0.0, -5.0]])
    out = est(api.KLInput(logprobs=lp, ref_logprobs=torch.zeros_like(lp), mask=torch.ones_like(lp)))
    torch.testing.assert_close(out, torch.tensor([[0.0, 5.0]]))


# ---------------------------------------------------------------------------------- batch_mean


def test_batch_mean_by_hand():
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # G = [1, 3], mean 2 → A = [-1, 1] on real tokens
    torch.testing.assert_close(
        plugin.batch_mean_advantages(rewards, mask), torch.tensor([[-1.0, -1.0, 0.0], [1.0, 1.0, 1.0]])
    )


def test_batch_mean_reads_an_advantage_input(registry):
    est = build(registry, "advantage", "batch_mean")
    out = est(
        api.AdvantageInput(
            rewards=torch.tensor([[1.0], [3.0]]),
            values=None,
            mask=torch.ones(2, 1),
            group_ids=torch.arange(2),
        )
    )
    torch.testing.assert_close(out.advantages, torch.tensor([[-1.0], [1.0]]))
    assert out.returns is None


# ---------------------------------------------------------------------------------- entropy_bonus


ENTROPY = torch.tensor([[1.0, 3.0, 9.0], [2.0, 0.0, 0.0], [4.0, 4.0, 4.0], [6.0, 0.0, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_sequence_mean_entropy_by_hand():
    # row means over real tokens: (1+3)/2 = 2, 2/1 = 2, 12/3 = 4, (6+0)/2 = 3; padding (the 9s) ignored
    torch.testing.assert_close(
        plugin.sequence_mean_entropy(ENTROPY, MASK), torch.tensor([2.0, 2.0, 4.0, 3.0])
    )
    # a row without real tokens counts 0
    assert float(plugin.sequence_mean_entropy(torch.ones(1, 2), torch.zeros(1, 2))) == 0.0


def test_entropy_bonus_by_hand():
    # mean of [2, 2, 4, 3] = 2.75 → −0.1 · 2.75
    loss = plugin.entropy_bonus_loss(ENTROPY, MASK, coef=0.1, share=1.0)
    assert float(loss) == pytest.approx(-0.275)


def test_entropy_bonus_is_exact_under_micro_batching(registry):
    """Rows [1] (share 1/4, one token) and [0, 2, 3] (share 3/4, seven tokens) as the two
    micro-batches of one minibatch: their losses and gradients sum to the single-batch ones."""
    bonus = build(registry, "extra_loss", "entropy_bonus", coef=0.1)

    def run(rows, share, index, count):
        entropy = ENTROPY[rows].clone().requires_grad_(True)
        batch = api.TokenBatch(
            torch.zeros(len(rows), 5, dtype=torch.long), torch.ones(len(rows), 5), torch.zeros(len(rows), 5),
            MASK[rows], 2,
        )  # fmt: skip
        out = api.PolicyOutput(logprobs=torch.zeros_like(entropy), entropy=entropy)
        inp = api.ExtraLossInput(
            batch=batch, output=out, policy=None, reference=None, task=None, step=0,
            micro_index=index, micro_count=count, share=share,
        )  # fmt: skip
        result = bonus(inp)
        result.loss.backward()
        return float(result.loss.detach()), result.metrics, entropy.grad

    whole, _, grad_whole = run([0, 1, 2, 3], 1.0, 0, 1)
    a, metrics_a, grad_a = run([1], 0.25, 0, 2)
    b, metrics_b, grad_b = run([0, 2, 3], 0.75, 1, 2)
    # −0.1 · mean([2, 2, 4, 3]) = −0.275;  a = −0.1 · 0.25 · 2 = −0.05;  b = −0.1 · 0.75 · 3 = −0.225
    assert whole == pytest.approx(-0.275)
    assert (a, b) == (pytest.approx(-0.05), pytest.approx(-0.225))
    assert a + b == pytest.approx(whole)
    torch.testing.assert_close(torch.cat([grad_a, grad_b]), grad_whole[[1, 0, 2, 3]])
    # the metric is unweighted: the micro-batch's own mean sequence entropy
    assert float(metrics_a["entropy"]) == pytest.approx(2.0)
    assert float(metrics_b["entropy"]) == pytest.approx(3.0)
    # why not the token mean: share-weighted micro-batch token means (2, 22/7) give 2.857, not the
    # minibatch's 24/8 = 3
    token_mean = lambda rows: float((ENTROPY[rows] * MASK[rows]).sum() / MASK[rows].sum())  # noqa: E731
    assert token_mean([0, 1, 2, 3]) == pytest.approx(3.0)
    assert 0.25 * token_mean([1]) + 0.75 * token_mean([0, 2, 3]) == pytest.approx(20 / 7)


def test_entropy_bonus_config_checks_its_range():
    with pytest.raises(ValueError, match="coef must be >= 0"):
        plugin.EntropyBonusConfig(coef=-1.0)


# ---------------------------------------------------------------------------------- group_rank


def test_group_ranks_by_hand():
    # group 0: scores [3, 1, 2] → ranks [2, 0, 1] of n=3 → 2r/2 − 1 = [1, −1, 0]
    # group 1: scores [5, 5] tie → both rank 0.5 of n=2 → 2·0.5/1 − 1 = 0
    # group 2: one sample → 0
    scores = torch.tensor([3.0, 1.0, 2.0, 5.0, 5.0, 7.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    torch.testing.assert_close(
        plugin.group_centred_ranks(scores, groups), torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0, 0.0])
    )


def test_group_ranks_with_interleaved_groups_and_a_three_way_tie():
    # group 0 = rows 0, 2, 4, 6: scores [0, 4, 4, 4] → ranks [0, 2, 2, 2] (mean of 1, 2, 3), n=4
    #   → 2r/3 − 1 = [−1, 1/3, 1/3, 1/3];  group 1 = rows 1, 3: [9, −9] → [1, −1];  group 2 = row 5 → 0
    scores = torch.tensor([0.0, 9.0, 4.0, -9.0, 4.0, 0.0, 4.0])
    groups = torch.tensor([0, 1, 0, 1, 0, 2, 0])
    out = plugin.group_centred_ranks(scores, groups)
    torch.testing.assert_close(out, torch.tensor([-1.0, 1.0, 1 / 3, -1.0, 1 / 3, 0.0, 1 / 3]))
    assert float(out.sum()) == pytest.approx(0.0, abs=1e-6)


def test_group_rank_reads_a_transform_input(registry):
    t = build(registry, "reward_transform", "group_rank", scale=0.5)
    inp = api.TransformInput(
        scores=torch.tensor([3.0, 1.0, 2.0, 5.0, 5.0]), prompts=[], completions=[],
        ended=torch.ones(5, dtype=torch.bool), lengths=torch.ones(5, dtype=torch.long),
        group_ids=torch.tensor([0, 0, 0, 1, 1]), max_new_tokens=4,
    )  # fmt: skip
    torch.testing.assert_close(t(inp), torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="scale must be > 0"):
        plugin.GroupRankConfig(scale=0.0)


# ---------------------------------------------------------------------------------- quantile_kl


def test_quantile_kl_update_by_hand():
    kl = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    # q=0.9 by linear interpolation: position 0.9·4 = 3.6 → 3 + 0.6·(4 − 3) = 3.6
    # target 3: e = 3.6/3 − 1 = 0.2 (at the clip); β = 0.1 · (1 + 0.2 · 50/1000) = 0.101
    assert plugin.quantile_kl_update(0.1, kl, 0.9, 3.0, 1000, 50) == pytest.approx(0.101)
    # q=0.5 → 2; target 2.5: e = −0.2 → β = 0.1 · (1 − 0.2 · 50/1000) = 0.099
    assert plugin.quantile_kl_update(0.1, kl, 0.5, 2.5, 1000, 50) == pytest.approx(0.099)
    # q=0.5 → 2; target 2.1: e = 2/2.1 − 1 = −0.047619 → β = 0.1 · (1 − 0.047619 · 0.05)
    assert plugin.quantile_kl_update(0.1, kl, 0.5, 2.1, 1000, 50) == pytest.approx(0.1 * (1 - 0.05 / 21))
    # the mean (2) is on target, but the tail is not: the quantile controller still raises β
    assert plugin.quantile_kl_update(0.1, kl, 0.9, 2.0, 1000, 50) > 0.1


def test_quantile_kl_controller_updates_and_round_trips(registry):
    ctl = build(registry, "kl_controller", "quantile_kl", coef=0.1, target=3.0, quantile=0.9, horizon=1000)
    assert ctl.coef == 0.1
    ctl.update(
        api.ControllerInput(
            kl=torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]), mean_kl=2.0, scores=torch.zeros(5), n_episodes=50,
            iteration=0, iterations=2,
        )
    )  # fmt: skip
    assert ctl.coef == pytest.approx(0.101)
    fresh = build(registry, "kl_controller", "quantile_kl", coef=0.1, target=3.0)
    fresh.load_state_dict(ctl.state_dict())
    assert fresh.coef == pytest.approx(0.101)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"quantile": 1.5}, "quantile must be in"),
        ({"target": 0.0}, "target must be > 0"),
        ({"horizon": 0}, "horizon must be > 0"),
        ({"coef": -0.1}, "coef must be >= 0"),
    ],
)
def test_quantile_kl_config_checks_its_ranges(keys, message):
    with pytest.raises(ValueError, match=message):
        plugin.QuantileKLConfig(**keys)


# ---------------------------------------------------------------------------------- registration


def test_registered_through_the_hooks(registry):
    assert registry.get("kl_estimator", "k3_clamped").description.startswith("k3 clamped")
    assert registry.get("advantage", "batch_mean").config is None
    assert not registry.needs("advantage", "batch_mean").values
    assert registry.get("extra_loss", "entropy_bonus").config is plugin.EntropyBonusConfig
    assert registry.get("reward_transform", "group_rank").config is plugin.GroupRankConfig
    assert registry.get("kl_controller", "quantile_kl").config is plugin.QuantileKLConfig
    ours = {s.name: s.plugin for s in registry.all() if s.plugin == "instructrl_example.plugin"}
    assert set(ours) == {"k3_clamped", "batch_mean", "entropy_bonus", "group_rank", "quantile_kl"}
    assert not registry.broken
