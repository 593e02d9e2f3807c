"""Masked statistics and the four loss aggregation modes (including gradient accumulation)."""

from __future__ import annotations

import pytest
import torch
from instructrl.core.ops import (
    AGGREGATIONS,
    aggregate,
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
)


def test_masked_stats_equal_torch_on_the_unmasked_subset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g)
    mask = (torch.rand(5, 7, generator=g) > 0.4).float()
    sel = x[mask.bool()]
    assert masked_mean(x, mask).item() == pytest.approx(sel.mean().item(), abs=1e-6)
    assert masked_var(x, mask).item() == pytest.approx(sel.var().item(), abs=1e-5)
    w = masked_whiten(x, mask)
    assert w[mask.bool()].mean().item() == pytest.approx(0.0, abs=1e-5)
    assert (w * (1 - mask)).abs().sum().item() == 0.0
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), (x * mask).sum(-1) / mask.sum(-1).clamp_min(1))


def test_aggregation_modes_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(loss, mask, "token_mean").item() == pytest.approx(10 / 4)  # (1+2+3+4)/4
    assert aggregate(loss, mask, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)  # means 2 and 4
    assert aggregate(loss, mask, "seq_mean_token_sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate(loss, mask, "seq_mean_token_sum_norm", norm_len=5).item() == pytest.approx(10 / (2 * 5))
    with pytest.raises(ValueError, match="aggregation must be one of"):
        aggregate(loss, mask, "mean")


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_micro_batches_sum_to_the_minibatch_loss(mode):
    g = torch.Generator().manual_seed(1)
    loss = torch.randn(8, 6, generator=g)
    lengths = torch.randint(1, 7, (8,), generator=g)
    mask = (torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1)).float()
    full = aggregate(loss, mask, mode, norm_len=6)
    totals = {"num_seqs": 8, "num_tokens": mask.sum(), "norm_len": 6}
    parts = sum(aggregate(loss[i : i + 2], mask[i : i + 2], mode, **totals) for i in range(0, 8, 2))
    assert parts.item() == pytest.approx(full.item(), abs=1e-5)


def test_logprobs_and_entropy_of_logits():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    assert logprobs_from_logits(logits, torch.tensor([[1]])).item() == pytest.approx(
        torch.log(torch.tensor(0.25)).item()
    )
    # H = -(.5 ln .5 + 2 · .25 ln .25) = 1.0397
    assert entropy_from_logits(logits).item() == pytest.approx(1.0397208, abs=1e-6)
