"""Reward transforms against hand values, including the stateful running whitening."""

from __future__ import annotations

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
    assert out.mean().item() == pytest.approx(0.0, abs=1e-6) and out.std().item() == pytest.approx(
        1.0, abs=1e-6
    )
    # gain = 1/std([1,2,3,4]) = 1/1.29099; bias = -gain·2.5
    gain, bias = fit_gain_bias(ref, 0.0, 1.0)
    assert gain == pytest.approx(1 / 1.2909944, rel=1e-6) and bias == pytest.approx(-2.5 * gain, rel=1e-6)


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
