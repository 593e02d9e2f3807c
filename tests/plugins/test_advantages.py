"""Advantage estimators against hand values and plain-loop implementations with padding."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from instructrl.core.errors import ConfigError
from instructrl.core.fields import validate
from instructrl.core.registry import BuildContext
from instructrl.core.types import AdvantageInput
from instructrl.plugins.advantages import GAEConfig, discounted_returns, gae, grpo_advantages, rloo_advantages


def random_padded(b=6, r=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, r + 1, (b,), generator=g)
    mask = (torch.arange(r).unsqueeze(0) < lengths.unsqueeze(1)).float()
    rewards = torch.randn(b, r, generator=g) * mask
    values = torch.randn(b, r, generator=g) * mask
    return rewards, values, mask, lengths


def test_gae_by_hand():
    # one sequence of 3 tokens, γ = 1, λ = 0.5; V = [1, 2, 3], r = [0, 0, 1]
    # δ = [0 + 2 - 1, 0 + 3 - 2, 1 + 0 - 3] = [1, 1, -2]
    # A_2 = -2; A_1 = 1 + 0.5·(-2) = 0; A_0 = 1 + 0.5·0 = 1
    adv, ret = gae(
        torch.tensor([[0.0, 0.0, 1.0, 0.0]]),
        torch.tensor([[1.0, 2.0, 3.0, 9.0]]),
        torch.tensor([[1.0, 1.0, 1.0, 0.0]]),
        1.0,
        0.5,
    )
    torch.testing.assert_close(adv, torch.tensor([[1.0, 0.0, -2.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[2.0, 2.0, 1.0, 0.0]]))


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_the_explicit_discounted_sum(gamma, lam):
    rewards, values, mask, lengths = random_padded()
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths.tolist()):
        v = values[i, :n].tolist() + [0.0]  # V after the last real token is 0
        deltas = [rewards[i, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            expected = sum((gamma * lam) ** l_ * deltas[t + l_] for l_ in range(n - t))
            assert adv[i, t].item() == pytest.approx(expected, abs=1e-5)
            assert ret[i, t].item() == pytest.approx(expected + v[t], abs=1e-5)
        assert adv[i, n:].abs().sum().item() == 0.0


def test_gae_with_lambda_one_and_gamma_one_is_return_minus_value():
    rewards, values, mask, lengths = random_padded(seed=3)
    adv, _ = gae(rewards, values, mask, 1.0, 1.0)
    rtg = discounted_returns(rewards, mask, 1.0)
    torch.testing.assert_close(adv, (rtg - values) * mask, atol=1e-5, rtol=1e-5)


def test_rloo_and_grpo_by_hand():
    returns = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0])
    groups = torch.tensor([0, 0, 0, 1, 1])
    # group 0: A_0 = 1 - (2+3)/2 = -1.5, A_1 = 2 - 2 = 0, A_2 = 3 - 1.5 = 1.5; group 1: 0, 0
    torch.testing.assert_close(rloo_advantages(returns, groups), torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0]))
    # group 0: mean 2, unbiased std 1 → [-1, 0, 1]; group 1: std 0 → 0/(0+eps) = 0
    torch.testing.assert_close(
        grpo_advantages(returns, groups, True, 1e-6),
        torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0]),
        atol=1e-5,
        rtol=0,
    )
    torch.testing.assert_close(
        grpo_advantages(returns, groups, False), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0])
    )


def test_rloo_and_grpo_match_per_group_loops():
    g = torch.Generator().manual_seed(5)
    returns = torch.randn(12, generator=g)
    groups = torch.tensor([3, 3, 3, 3, 7, 7, 7, 7, 1, 1, 1, 1])[torch.randperm(12, generator=g)]
    rloo, grpo, dr = (
        rloo_advantages(returns, groups),
        grpo_advantages(returns, groups),
        grpo_advantages(returns, groups, False),
    )
    for i in range(12):
        members = [j for j in range(12) if groups[j] == groups[i]]
        others = [returns[j].item() for j in members if j != i]
        assert rloo[i].item() == pytest.approx(returns[i].item() - sum(others) / len(others), abs=1e-5)
        vals = torch.tensor([returns[j].item() for j in members])
        assert grpo[i].item() == pytest.approx(
            (returns[i].item() - vals.mean().item()) / (vals.std().item() + 1e-6), abs=1e-4
        )
        assert dr[i].item() == pytest.approx(returns[i].item() - vals.mean().item(), abs=1e-5)


def test_group_estimators_reject_singleton_groups():
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        rloo_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))


def test_discounted_returns_by_hand():
    # r = [1, 0, 2], γ = 0.5: G = [1 + 0.5·0 + 0.25·2, 0 + 0.5·2, 2] = [1.5, 1, 2]
    out = discounted_returns(torch.tensor([[1.0, 0.0, 2.0, 5.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 0.5)
    torch.testing.assert_close(out, torch.tensor([[1.5, 1.0, 2.0, 0.0]]))


def build(registry, name, **cfg):
    spec = registry.get("advantage", name)
    conf = registry.config_for_block("advantage", name, cfg, "advantage")
    return spec.factory(conf, BuildContext(registry=registry))


def test_components_share_one_signature_and_broadcast_over_tokens(registry):
    rewards, values, mask, _ = random_padded(b=8, seed=2)
    groups = torch.arange(8) // 4
    baseline = torch.randn(8)
    inp = AdvantageInput(rewards=rewards, values=values, mask=mask, group_ids=groups, baseline=baseline)
    critic_free = dataclasses.replace(inp, values=None)
    for name in registry.names("advantage"):
        est = build(registry, name)
        needs_values = registry.needs("advantage", name).values
        out = est(inp if needs_values else critic_free)
        assert out.advantages.shape == rewards.shape
        assert (out.advantages * (1 - mask)).abs().sum() == 0, name
        assert (out.returns is not None) == needs_values, name
    seq = (rewards * mask).sum(-1)
    remax = build(registry, "remax")(critic_free)
    torch.testing.assert_close(remax.advantages, (seq - baseline).unsqueeze(-1) * mask)
    with pytest.raises(ValueError, match="remax needs AdvantageInput.baseline"):
        build(registry, "remax")(dataclasses.replace(critic_free, baseline=None))


def test_reinforce_pp_is_globally_whitened(registry):
    rewards, _, mask, _ = random_padded(b=8, seed=4)
    out = build(registry, "reinforce_pp")(
        AdvantageInput(rewards=rewards, values=None, mask=mask, group_ids=torch.arange(8))
    ).advantages
    sel = out[mask.bool()]
    assert sel.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert sel.std().item() == pytest.approx(1.0, abs=1e-4)


def test_estimator_requirements_are_declared_not_built(registry):
    before = registry.builds
    req = {n: registry.needs("advantage", n) for n in registry.names("advantage")}
    assert registry.builds == before
    assert req["gae"].values and req["gae"].default_samples_per_prompt == 1
    assert req["rloo"].min_samples_per_prompt == 2 and req["grpo"].default_samples_per_prompt == 4
    assert req["remax"].greedy_baseline and not req["reinforce_pp"].values


def test_gae_config_errors():
    with pytest.raises(ConfigError, match=r"^advantage\.lam must be in \[0, 1\] \(got 1\.5\)$"):
        validate(GAEConfig, {"lam": 1.5}, "advantage")


def grpo_loop(returns, groups, eps):
    """Plain-loop GRPO: per group (G − mean)/(unbiased std + eps), 0 for a group of equal returns."""
    out = []
    for i in range(len(returns)):
        vals = [float(returns[j]) for j in range(len(returns)) if groups[j] == groups[i]]
        mean = sum(vals) / len(vals)
        std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
        out.append(0.0 if std == 0 else (float(returns[i]) - mean) / (std + eps))
    return torch.tensor(out)


@pytest.mark.parametrize("eps", [0.0, 1e-6, 0.1])
def test_grpo_gives_constant_groups_zero_advantage_for_every_eps(eps):
    # group 0: [1, 2, 3] mean 2, std 1 → [-1, 0, 1]/(1 + eps); group 1: [4, 4] (std 0: was NaN with eps 0)
    # group 2: four 1000.1 (float32 mean off by an ulp gave ±1 noise without the shift)
    returns = torch.tensor([1.0, 4.0, 2.0, 1000.1, 4.0, 3.0, 1000.1, 1000.1, 1000.1])
    groups = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 2])
    out = grpo_advantages(returns, groups, True, eps)
    expected = torch.tensor([-1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / torch.tensor(
        [1 + eps, 1, 1 + eps, 1, 1, 1 + eps, 1, 1, 1]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert out[[1, 3, 4, 6, 7, 8]].abs().max().item() == 0.0  # exactly 0
    torch.testing.assert_close(out, grpo_loop(returns, groups, eps), rtol=0, atol=1e-6)
    torch.testing.assert_close(grpo_advantages(returns, groups, False)[[1, 3, 4, 6, 7, 8]], torch.zeros(6))


def test_rloo_of_equal_returns_is_exactly_zero_even_whitened(registry):
    # float32 gave 6.1e-5 for four 1000.1 (the group sum rounds); the max-shift makes it exact
    returns = torch.tensor([1000.1] * 4 + [-3.0, -3.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    assert rloo_advantages(returns, groups).abs().max().item() == 0.0
    rewards = torch.zeros(6, 3)
    rewards[:, -1] = returns
    inp = AdvantageInput(rewards=rewards, values=None, mask=torch.ones(6, 3), group_ids=groups)
    assert build(registry, "rloo", whiten=True)(inp).advantages.abs().max().item() == 0.0


def test_reinforce_pp_whitening_of_equal_returns_and_of_one_token_is_zero(registry):
    # equal returns-to-go 1000.1 on every real token whitened to -0.51 in float32; float64 gives 0
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    rewards = torch.zeros(3, 4)
    rewards[0, 2], rewards[1, 1], rewards[2, 3] = 1000.1, 1000.1, 1000.1
    est = build(registry, "reinforce_pp")
    out = est(AdvantageInput(rewards=rewards, values=None, mask=mask, group_ids=torch.arange(3))).advantages
    torch.testing.assert_close(out, torch.zeros(3, 4), rtol=0, atol=1e-6)
    # a batch of one real token: its std is 0, so it whitens to 0 (not NaN)
    one = AdvantageInput(
        rewards=torch.tensor([[2.5, 9.0]]),
        values=None,
        mask=torch.tensor([[1.0, 0.0]]),
        group_ids=torch.zeros(1),
    )
    torch.testing.assert_close(est(one).advantages, torch.zeros(1, 2))
    # an ordinary batch against a loop: returns-to-go, then (G − mean)/sqrt(unbiased var + 1e-8) over real tokens
    r, _, m, lengths = random_padded(b=5, seed=7)
    out = est(AdvantageInput(rewards=r, values=None, mask=m, group_ids=torch.arange(5))).advantages
    togo = [
        [sum(float(r[i, s]) for s in range(t, n)) for t in range(n)] for i, n in enumerate(lengths.tolist())
    ]
    flat = [v for row in togo for v in row]
    mean = sum(flat) / len(flat)
    std = (sum((v - mean) ** 2 for v in flat) / (len(flat) - 1) + 1e-8) ** 0.5
    for i, row in enumerate(togo):
        torch.testing.assert_close(out[i, : len(row)], torch.tensor([(v - mean) / std for v in row]))
