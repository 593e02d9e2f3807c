"""KL estimators against their formulas and the exact KL; controllers against hand-stepped values."""

from __future__ import annotations

import math

import pytest
import torch
from instructrl.core.errors import ConfigError
from instructrl.core.fields import validate
from instructrl.core.types import ControllerInput, KLInput
from instructrl.plugins.kl import (
    AdaptiveKL,
    AdaptiveKLConfig,
    FixedKL,
    adaptive_kl_update,
    kl_abs,
    kl_full,
    kl_k1,
    kl_k2,
    kl_k3,
)


def test_estimators_by_hand():
    lp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    # Δ = [0.5, -1.0]
    torch.testing.assert_close(kl_k1(lp, ref), torch.tensor([[0.5, -1.0]]))
    torch.testing.assert_close(kl_k2(lp, ref), torch.tensor([[0.125, 0.5]]))
    # k3 = e^-Δ + Δ - 1: e^-0.5 + 0.5 - 1 = 0.10653; e^1 - 1 - 1 = 0.71828
    torch.testing.assert_close(kl_k3(lp, ref), torch.tensor([[math.exp(-0.5) - 0.5, math.e - 2.0]]))
    torch.testing.assert_close(kl_abs(lp, ref), torch.tensor([[0.5, 1.0]]))


def test_full_kl_by_hand():
    # p = (0.5, 0.5), q = (0.25, 0.75): KL = 0.5 ln 2 + 0.5 ln(2/3) = 0.14384
    logits = torch.log(torch.tensor([[[0.5, 0.5]]]))
    ref = torch.log(torch.tensor([[[0.25, 0.75]]]))
    assert kl_full(logits, ref).item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-6)


def test_k1_and_k3_expectations_equal_the_exact_kl_on_a_categorical():
    torch.manual_seed(0)
    logits, ref_logits = torch.randn(7), torch.randn(7)
    p, logp, logq = logits.softmax(-1), logits.log_softmax(-1), ref_logits.log_softmax(-1)
    exact = kl_full(logits.view(1, 1, -1), ref_logits.view(1, 1, -1)).item()
    # expectation over y ~ p by enumerating the support (no sampling)
    e_k1 = (p * kl_k1(logp, logq)).sum().item()
    e_k3 = (p * kl_k3(logp, logq)).sum().item()
    e_k2 = (p * kl_k2(logp, logq)).sum().item()
    assert e_k1 == pytest.approx(exact, abs=1e-6)
    assert e_k3 == pytest.approx(exact, abs=1e-6)
    assert e_k2 != pytest.approx(exact, abs=1e-3)  # k2 is biased
    assert bool((kl_k3(logp, logq) >= 0).all()) and bool((kl_k2(logp, logq) >= 0).all())


def test_k2_gradient_is_the_kl_gradient_and_k1s_is_zero_on_policy():
    # E_{y~π}[∇ k(y)] with θ the policy logits, by enumeration
    torch.manual_seed(1)
    theta = torch.randn(5, requires_grad=True)
    logq = torch.randn(5).log_softmax(-1)

    def expected_grad(fn):
        logp = theta.log_softmax(-1)
        p = logp.exp().detach()
        g = torch.autograd.grad((p * fn(logp, logq)).sum(), theta)[0]
        return g

    logp = theta.log_softmax(-1)
    true = torch.autograd.grad((logp.exp() * (logp - logq)).sum(), theta)[0]
    torch.testing.assert_close(expected_grad(kl_k2), true, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(expected_grad(kl_k1), torch.zeros(5), atol=1e-6, rtol=0)


def test_estimator_components_and_the_full_one_needs_logits(registry):
    from instructrl.core.registry import BuildContext

    ctx = BuildContext(registry=registry)
    inp = KLInput(logprobs=torch.tensor([[0.0, -1.0]]), ref_logprobs=torch.tensor([[-1.0, -1.0]]))
    for name, expected in {"k1": [1.0, 0.0], "k2": [0.5, 0.0], "abs": [1.0, 0.0]}.items():
        est = registry.build("kl_estimator", name, None, ctx)
        assert registry.needs("kl_estimator", name).logits is False
        torch.testing.assert_close(est(inp), torch.tensor([expected]))
    full = registry.build("kl_estimator", "full", None, ctx)
    assert registry.needs("kl_estimator", "full").logits is True
    with pytest.raises(ValueError, match="needs the policy and reference logits"):
        full(inp)


def observed(kl, n):
    return ControllerInput(
        kl=torch.full((4,), kl), mean_kl=kl, scores=torch.zeros(4), n_episodes=n, iteration=0, iterations=1
    )


def test_adaptive_controller_hand_stepped():
    ctl = AdaptiveKL(coef=0.1, target=6.0, horizon=1000)
    # 1) KL 9 → e = clip(9/6 - 1, ±0.2) = 0.2 (upper clip); β = 0.1·(1 + 0.2·100/1000) = 0.102
    ctl.update(observed(9.0, 100))
    assert ctl.coef == pytest.approx(0.102)
    # 2) KL 6.6 → e = 0.1; β = 0.102·(1 + 0.1·500/1000) = 0.1071
    ctl.update(observed(6.6, 500))
    assert ctl.coef == pytest.approx(0.1071)
    # 3) KL 0 → e = clip(-1, ±0.2) = -0.2 (lower clip); β = 0.1071·(1 - 0.2·1000/1000) = 0.08568
    ctl.update(observed(0.0, 1000))
    assert ctl.coef == pytest.approx(0.08568)
    restored = AdaptiveKL(coef=0.5, target=6.0, horizon=1000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.coef == ctl.coef
    assert adaptive_kl_update(1.0, 6.0, 6.0, 10, 5) == 1.0  # on target: unchanged


def test_fixed_controller_never_moves():
    ctl = FixedKL(0.02)
    ctl.update(observed(100.0, 10_000))
    assert ctl.coef == 0.02


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"target": 0.0}, r"^kl\.target must be > 0 \(got 0\.0\)$"),
        ({"horizon": 0}, r"^kl\.horizon must be > 0"),
        ({"coef": -1}, r"^kl\.coef must be >= 0"),
    ],
)
def test_adaptive_config_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        validate(AdaptiveKLConfig, data, "kl")
