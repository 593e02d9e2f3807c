"""The clipped surrogate at its boundaries, asymmetric and dual clip; vanilla PG."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from instructrl.core.errors import ConfigError
from instructrl.core.fields import validate
from instructrl.core.types import ObjectiveInput
from instructrl.plugins.objectives import PGConfig, PolicyGradient, PPOClip, PPOClipConfig, ppo_clip_loss


def test_ppo_clip_by_hand():
    # ratios e^0.5 = 1.6487 and e^-0.5 = 0.6065 around old logprob 0; ε = 0.2
    lp = torch.tensor([[0.5, 0.5, -0.5, -0.5]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, clipped = ppo_clip_loss(lp, torch.zeros_like(lp), adv, 0.2, 0.2)
    # A>0, r=1.65: max(-1.65, -1.2) = -1.2 (clipped); A<0, r=1.65: max(1.65, 1.2) = 1.65 (unclipped)
    # A>0, r=0.61: max(-0.61, -0.8) = -0.61 (unclipped); A<0, r=0.61: max(0.61, 0.8) = 0.8 (clipped)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, math.exp(0.5), -math.exp(-0.5), 0.8]]))
    assert clipped.tolist() == [[True, False, False, True]]


def test_ppo_clip_exactly_at_the_boundaries_is_not_clipped():
    lp = torch.log(torch.tensor([[1.2, 0.8]]))
    adv = torch.tensor([[1.0, -1.0]])
    loss, clipped = ppo_clip_loss(lp, torch.zeros_like(lp), adv, 0.2, 0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 0.8]]))
    assert not clipped.any()


def test_asymmetric_clip_and_dual_clip():
    lp = torch.log(torch.tensor([[1.5, 5.0]]))
    adv = torch.tensor([[1.0, -1.0]])
    # clip_high 0.28: r=1.5 → -min(1.5, 1.28) = -1.28
    loss, _ = ppo_clip_loss(lp, torch.zeros_like(lp), adv, 0.2, 0.28)
    assert loss[0, 0].item() == pytest.approx(-1.28)
    # A<0, r=5: plain loss max(5, 1.2) = 5; dual clip c=3 caps it at -c·A = 3
    assert loss[0, 1].item() == pytest.approx(5.0)
    dual, clipped = ppo_clip_loss(lp, torch.zeros_like(lp), adv, 0.2, 0.2, dual_clip=3.0)
    assert dual[0, 1].item() == pytest.approx(3.0) and bool(clipped[0, 1])


def test_objective_component_masks_and_reports_metrics():
    obj = PPOClip(PPOClipConfig())
    lp = torch.tensor([[0.5, 0.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    out = obj(
        ObjectiveInput(
            logprobs=lp, old_logprobs=torch.zeros_like(lp), advantages=torch.ones_like(lp), mask=mask
        )
    )
    assert out.loss[0, 2].item() == 0.0
    assert out.metrics["clip_frac"].item() == pytest.approx(0.5)
    # approx-KL = mean over real tokens of (r - 1) - log r: (e^.5 - 1 - .5 + 0) / 2
    assert out.metrics["approx_kl"].item() == pytest.approx((math.exp(0.5) - 1.5) / 2, abs=1e-6)
    assert out.metrics["ratio_max_dev"].item() == pytest.approx(math.exp(0.5) - 1, abs=1e-6)
    assert obj.aggregation == "token_mean"


def test_vanilla_pg_gradient_is_minus_advantage_times_score():
    lp = torch.tensor([[-0.3, -1.2]], requires_grad=True)
    out = PolicyGradient(PGConfig())(
        ObjectiveInput(
            logprobs=lp,
            old_logprobs=lp.detach(),
            advantages=torch.tensor([[2.0, -1.0]]),
            mask=torch.ones(1, 2),
        )
    )
    out.loss.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-2.0, 1.0]]))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"clip": 0}, r"^objective\.clip must be > 0"),
        ({"dual_clip": 0.5}, r"^objective\.dual_clip must be > 1"),
        ({"aggregation": "mean"}, r"^objective\.aggregation: Invalid value 'mean'"),
    ],
)
def test_config_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        validate(PPOClipConfig, data, "objective")


def test_a_field_added_to_the_input_does_not_break_an_old_plugin():
    """Inputs are extended additively: a plugin written against fewer fields keeps working."""

    class OldStylePG:  # reads only the fields of API v1's first release
        aggregation = "token_mean"

        def __call__(self, inp):
            return -inp.advantages * inp.logprobs * inp.mask

    newer = dataclasses.make_dataclass(
        "ObjectiveInputV2", [("kl_to_init", float, 0.0)], bases=(ObjectiveInput,), frozen=True, kw_only=True
    )
    lp, adv, mask = torch.tensor([[-0.5, -1.0]]), torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    inp = newer(logprobs=lp, old_logprobs=lp, advantages=adv, mask=mask, kl_to_init=3.0)
    torch.testing.assert_close(OldStylePG()(inp), torch.tensor([[0.5, 0.0]]))
    builtin = PPOClip(PPOClipConfig())(inp)  # the built-ins too
    torch.testing.assert_close(builtin.loss, torch.tensor([[-1.0, 0.0]]))
