"""Reward transforms against hand values, including the stateful running whitening."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from instructrl.core.errors import ConfigError
from instructrl.core.fields import validate
from instructrl.core.registry import BuildContext
from instructrl.core.types import Completion, Prompt, TransformInput
from instructrl.plugins.reward_transforms import ClipConfig, RunningWhiten, RunningWhitenConfig, fit_gain_bias


def shaping(scores, ended=None, lengths=None, is_baseline=False):
    scores = torch.tensor(scores)
    ended = torch.ones_like(scores, dtype=torch.bool) if ended is None else torch.tensor(ended)
    lengths = torch.full_like(scores, 4, dtype=torch.long) if lengths is None else torch.tensor(lengths)
    n = len(scores)
    return TransformInput(
        scores=scores, prompts=[Prompt(str(i), "p") for i in range(n)], completions=[Completion("c")] * n,
        ended=ended, lengths=lengths, group_ids=torch.arange(n), max_new_tokens=8, is_baseline=is_baseline,
    )  # fmt: skip


class KnownDemoMean:
    def __init__(self, mean):
        self.mean = mean

    def score(self, inp):
        raise AssertionError("not called")

    def demo_mean(self):
        return self.mean


def build(registry, name, ctx=None, **cfg):
    conf = registry.config_for_block("reward_transform", name, cfg, "reward_transforms[0]")
    return registry.get("reward_transform", name).factory(conf, ctx or BuildContext(registry=registry))


def test_demo_bias_reads_the_rm_statistics_then_falls_back_to_scoring(registry):
    t = build(registry, "demo_bias", BuildContext(registry=registry, reward_model=KnownDemoMean(0.75)))
    torch.testing.assert_close(t(shaping([1.0, 0.0])), torch.tensor([0.25, -0.75]))
    calls = []
    ctx = BuildContext(
        registry=registry,
        reward_model=KnownDemoMean(None),
        score_demonstrations=lambda: calls.append(1) or torch.tensor([1.0, 3.0]),
    )
    t2 = build(registry, "demo_bias", ctx)
    torch.testing.assert_close(t2(shaping([2.0])), torch.tensor([0.0]))  # mean of demos = 2
    assert calls == [1]
    t3 = build(registry, "demo_bias", bias=0.5)
    torch.testing.assert_close(t3(shaping([2.0])), torch.tensor([1.5]))


def test_gain_bias_maps_reference_samples_to_the_target(registry):
    ref = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ctx = BuildContext(registry=registry, score_reference_samples=lambda n: ref[:n])
    t = build(registry, "gain_bias", ctx, n_samples=4, target_mean=0.0, target_std=1.0)
    out = t(shaping(ref.tolist()))
    # lm-human-preferences normalises with the population std (n, not n - 1)
    assert out.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert out.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    # gain = 1/std_pop([1,2,3,4]) = 1/sqrt(1.25) = 1/1.1180340; bias = -gain·2.5
    gain, bias = fit_gain_bias(ref, 0.0, 1.0)
    assert gain == pytest.approx(1 / 1.1180340, rel=1e-6) and bias == pytest.approx(-2.5 * gain, rel=1e-6)
    # target N(1, 2²): gain 2/1.1180340, bias 1 - gain·2.5
    gain, bias = fit_gain_bias(ref, 1.0, 2.0)
    assert gain == pytest.approx(2 / 1.1180340, rel=1e-6) and bias == pytest.approx(1 - 2.5 * gain, rel=1e-6)


def test_gain_bias_of_constant_reference_scores_only_shifts():
    # std 0: no spread to scale, so gain 1 and the bias moves the mean 3 to the target 0.5
    assert fit_gain_bias(torch.full((4,), 3.0), 0.5, 1.0) == (1.0, -2.5)
    # large equal scores: gain exactly 1 (not target_std / 1e-8 as before)
    gain, bias = fit_gain_bias(torch.full((7,), 1000.1), 0.0, 1.0)
    assert gain == 1.0 and bias == pytest.approx(-1000.1, rel=1e-7)
    with pytest.raises(ValueError, match="not all finite"):
        fit_gain_bias(torch.tensor([1.0, float("inf")]), 0.0, 1.0)


def test_whiten_with_and_without_mean_shift(registry):
    s = [1.0, 2.0, 3.0, 6.0]  # mean 3, unbiased std 2.1602
    out = build(registry, "whiten")(shaping(s))
    torch.testing.assert_close(out, (torch.tensor(s) - 3.0) / 2.1602469, atol=1e-5, rtol=1e-5)
    keep = build(registry, "whiten", shift_mean=False)(shaping(s))
    torch.testing.assert_close(keep, (torch.tensor(s) - 3.0) / 2.1602469 + 3.0, atol=1e-5, rtol=1e-5)


def test_running_whiten_equals_whitening_over_everything_seen():
    t = RunningWhiten(RunningWhitenConfig(eps=0.0))
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0])
    t(shaping(a.tolist()))
    out = t(shaping(b.tolist()))
    seen = torch.cat([a, b])
    torch.testing.assert_close(out, (b - seen.mean()) / seen.std(), atol=1e-5, rtol=1e-5)
    state = t.state_dict()
    assert state["count"] == 5.0
    t2 = RunningWhiten(RunningWhitenConfig(eps=0.0))
    t2.load_state_dict(state)
    torch.testing.assert_close(t2(shaping([5.0])), t(shaping([5.0])))


def test_running_whiten_does_not_update_on_a_remax_baseline(registry):
    t = RunningWhiten(RunningWhitenConfig(eps=0.0))
    t(shaping([1.0, 2.0, 3.0]))
    before = t.state_dict()
    # the greedy baseline of ReMax is whitened with the current statistics, which it leaves alone
    out = t(shaping([10.0, 20.0], is_baseline=True))
    assert t.state_dict() == before
    torch.testing.assert_close(out, (torch.tensor([10.0, 20.0]) - 2.0) / 1.0)
    assert registry.needs("reward_transform", "running_whiten").stateful


def test_clip_missing_eos_and_length_penalty(registry):
    torch.testing.assert_close(
        build(registry, "clip", low=-1.0, high=1.0)(shaping([-3.0, 0.5, 2.0])), torch.tensor([-1.0, 0.5, 1.0])
    )
    inp = shaping([0.8, 0.3], ended=[True, False])
    torch.testing.assert_close(build(registry, "missing_eos_penalty")(inp), torch.tensor([0.8, -1.0]))
    torch.testing.assert_close(
        build(registry, "missing_eos_penalty", penalty=-0.5, mode="add")(inp), torch.tensor([0.8, -0.2])
    )
    torch.testing.assert_close(
        build(registry, "length_penalty", coef=0.1)(shaping([1.0, 1.0], lengths=[2, 5])),
        torch.tensor([0.8, 0.5]),
    )


def test_transforms_needing_calibration_say_what_is_missing(registry):
    with pytest.raises(ValueError, match="gain_bias needs a way to score reference-policy samples"):
        build(registry, "gain_bias")
    with pytest.raises(ValueError, match="demo_bias needs"):
        build(registry, "demo_bias", BuildContext(registry=registry, reward_model=KnownDemoMean(None)))


def test_clip_config_rejects_an_empty_range():
    with pytest.raises(ConfigError, match=r"^reward_transforms\[0\]\.low must be < high"):
        validate(ClipConfig, {"low": 1.0, "high": 1.0}, "reward_transforms[0]")


def running_reference(batches, eps):
    """Plain-loop float64 reference: after each batch, whiten it with the mean and unbiased std of
    every score seen so far (variance 1 below two scores)."""
    seen, outs = [], []
    for batch in batches:
        seen += [float(v) for v in batch]
        n = len(seen)
        mean = sum(seen) / n
        var = sum((v - mean) ** 2 for v in seen) / (n - 1) if n > 1 else 1.0
        outs.append([(float(v) - mean) / (var + eps) ** 0.5 for v in batch])
    return outs


def test_running_whiten_keeps_a_tiny_spread_around_a_large_mean():
    # Σx² − n·mean² in float32 made the variance negative: the std became complex and every score ~1e-17
    scores = 1e6 + torch.tensor([0.0, 1e-3, 2e-3], dtype=torch.float64)
    t = RunningWhiten(RunningWhitenConfig())  # eps 1e-8
    out = t(dataclasses.replace(shaping([0.0] * 3), scores=scores))
    assert not out.is_complex() and bool(torch.isfinite(out).all())
    # mean 1e6 + 1e-3, unbiased std 1e-3: by hand (x − mean)/sqrt(1e-6 + 1e-8) = [-1, 0, 1]/1.0049876
    torch.testing.assert_close(
        out, torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / 1.0049876, rtol=0, atol=1e-6
    )
    torch.testing.assert_close(
        out, torch.tensor(running_reference([scores.tolist()], 1e-8)[0], dtype=torch.float64)
    )
    assert t.m2 == pytest.approx(2e-6, rel=1e-6) and t.m2 >= 0.0


def test_running_whiten_matches_a_float64_loop_over_batches_and_round_trips():
    g = torch.Generator().manual_seed(0)
    batches = [1e3 + 1e-2 * torch.randn(n, generator=g) for n in (5, 1, 8, 3)]  # float32 scores
    t = RunningWhiten(RunningWhitenConfig(eps=1e-8))
    expected = running_reference([b.double().tolist() for b in batches], 1e-8)
    for b, e in zip(batches, expected):
        out = t(shaping(b.tolist()))
        assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
        torch.testing.assert_close(out, torch.tensor(e, dtype=torch.float32), rtol=0, atol=1e-4)
    # the state is plain floats; a fresh transform continues identically
    state = t.state_dict()
    assert state["count"] == 17.0 and all(isinstance(v, float) for v in state.values())
    t2 = RunningWhiten(RunningWhitenConfig(eps=1e-8))
    t2.load_state_dict(state)
    nxt = shaping((1e3 + torch.tensor([0.01, -0.02])).tolist())
    torch.testing.assert_close(t2(nxt), t(nxt), rtol=0, atol=0)
    assert t2.state_dict() == t.state_dict()


def test_running_whiten_of_equal_scores_only_shifts_with_eps_zero():
    # M2 = 0 and eps = 0: std 0 → the scores are shifted, not divided by 0
    t = RunningWhiten(RunningWhitenConfig(eps=0.0))
    torch.testing.assert_close(t(shaping([5.0, 5.0])), torch.tensor([0.0, 0.0]))
    # then [5, 7]: mean of [5, 5, 5, 7] = 5.5, unbiased var = (3·0.25 + 2.25)/3 = 1
    torch.testing.assert_close(t(shaping([5.0, 7.0])), torch.tensor([-0.5, 1.5]))
    with pytest.raises(ConfigError, match=r"eps must be >= 0"):
        validate(RunningWhitenConfig, {"eps": -1.0}, "reward_transforms[0]")


def test_whiten_of_equal_scores_and_of_one_score_is_zero(registry):
    # float32 statistics whitened seven scores of 1000.1 to -0.51 each; float64 gives 0
    w = build(registry, "whiten")
    torch.testing.assert_close(w(shaping([1000.1] * 7)), torch.zeros(7), rtol=0, atol=1e-6)
    torch.testing.assert_close(w(shaping([3.0])), torch.zeros(1))
    torch.testing.assert_close(
        build(registry, "whiten", shift_mean=False)(shaping([3.0])), torch.tensor([3.0])
    )
    # and a loop reference on an ordinary batch
    s = [0.5, -1.0, 2.0, 4.5, 0.0]
    mean = sum(s) / 5
    std = (sum((v - mean) ** 2 for v in s) / 4 + 1e-8) ** 0.5
    torch.testing.assert_close(w(shaping(s)), torch.tensor([(v - mean) / std for v in s]))
