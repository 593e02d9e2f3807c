"""Tests a plugin author would write: the maths against hand values, and registration."""

import math

import torch
from instructrl.core.registry import make_registry
from instructrl_example import plugin


def test_k3_clamped_by_hand():
    # Δ = 0 → 0;  Δ = 1 → e^-1 + 1 - 1 = 0.3679;  Δ = -5 → e^5 - 5 - 1 = 142.41 → clamped to 10
    lp = torch.tensor([[0.0, 1.0, -5.0]])
    out = plugin.k3_clamped(lp, torch.zeros_like(lp), max_value=10.0)
    torch.testing.assert_close(out, torch.tensor([[0.0, math.exp(-1), 10.0]]))


def test_batch_mean_by_hand():
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # G = [1, 3], mean 2 → A = [-1, 1] on real tokens
    torch.testing.assert_close(
        plugin.batch_mean_advantages(rewards, mask), torch.tensor([[-1.0, -1.0, 0.0], [1.0, 1.0, 1.0]])
    )


def test_registered_through_the_hooks():
    reg = make_registry([plugin], autoload=False)
    assert reg.get("kl_estimator", "k3_clamped").description.startswith("k3 clamped")
    assert reg.get("advantage", "batch_mean").config is None
