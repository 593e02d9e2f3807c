"""Hand-computed checks of the pipeline's own maths: RM loss, reward placement, value loss,
win-rate arithmetic, and the left-padding invariance of scores and logprobs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from instructrl.core.types import Completion, Prompt, Ranking, position_ids_from_mask
from instructrl.plugins.models import build_causal_lm, score_last_token, train_tokenizer
from instructrl.plugins.stages.common import encode_pairs
from instructrl.plugins.stages.evaluate import win_stats
from instructrl.plugins.stages.rl_step import clipped_value_loss, explained_variance, per_token_rewards
from instructrl.plugins.stages.rm import collate_rankings, rm_loss


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_rm_loss_k3_by_hand():
    # scores of responses a, b, c ranked a > b > c: pairs (a,b), (a,c), (b,c), each weighted 1/3
    scores = torch.tensor([2.0, 1.0, -1.0])
    winners, losers = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2])
    weights = torch.full((3,), 1 / 3)
    # log σ(1) = -0.31326, log σ(3) = -0.04859, log σ(2) = -0.12693 → loss = 0.48878 / 3 = 0.16293
    expected = -(log_sigmoid(1.0) + log_sigmoid(3.0) + log_sigmoid(2.0)) / 3
    assert rm_loss(scores, winners, losers, weights, n_prompts=1).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.16293, abs=1e-5)


def test_rm_loss_k4_with_a_tie_weights_each_prompt_by_its_non_tied_pairs():
    prompt = Prompt("p", "x")
    # K=4, ranks (0, 1, 1, 2): b and c tie → 5 non-tied pairs, each weighted 1/5
    r1 = Ranking(prompt, tuple(Completion(t) for t in "abcd"), (0, 1, 1, 2))
    # K=4 with no ties → C(4,2) = 6 pairs, each weighted 1/6
    r2 = Ranking(prompt, tuple(Completion(t) for t in "abcd"), (3, 2, 1, 0))
    assert len(r1.pairs()) == 5 and len(r2.pairs()) == 6
    tok = train_tokenizer(["abcdx"])
    rb = collate_rankings(tok, [r1, r2], 8, 4)
    scores = torch.tensor([1.0, 0.0, 0.5, -1.0, 0.0, 0.0, 0.0, 0.0])
    # prompt 1 margins: a-b 1, a-c .5, a-d 2, b-d 1, c-d 1.5; prompt 2: all margins 0 → log σ(0) = -ln 2
    p1 = -(log_sigmoid(1) + log_sigmoid(0.5) + log_sigmoid(2) + log_sigmoid(1) + log_sigmoid(1.5)) / 5
    p2 = math.log(2)
    expected = (p1 + p2) / 2
    assert rm_loss(scores, rb.winners, rb.losers, rb.weights, rb.n_prompts).item() == pytest.approx(
        expected, rel=1e-6
    )
    assert rb.weights.sum().item() == pytest.approx(2.0)  # each prompt's weights sum to 1


def test_per_token_rewards_put_the_score_on_the_last_real_token():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0], [0.0, 0.0, 0.0, 0.4]])
    scores = torch.tensor([1.0, 2.0, 3.0])
    r = per_token_rewards(scores, kl, mask, beta=0.1)
    expected = torch.tensor(
        [[-0.01, -0.02, 1.0 - 0.03, 0.0], [2.0 - 0.05, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0 - 0.04]]
    )
    torch.testing.assert_close(r, expected)
    # padding never carries reward; the sum is score − β Σ KL
    torch.testing.assert_close(r.sum(-1), scores - 0.1 * (kl * mask).sum(-1))


def test_clipped_value_loss_by_hand():
    v, old, ret = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([2.0, 1.0])
    # row 0: unclipped (1-2)² = 1; clipped V = 0 + clip(1, ±0.2) = 0.2 → (0.2-2)² = 3.24; max → 3.24, ½ → 1.62
    # row 1: V = old = 0 → (0-1)² = 1 both ways → 0.5
    torch.testing.assert_close(clipped_value_loss(v, old, ret, 0.2), torch.tensor([1.62, 0.5]))
    torch.testing.assert_close(clipped_value_loss(v, old, ret, None), torch.tensor([0.5, 0.5]))


def test_explained_variance_is_one_for_perfect_values_and_zero_for_a_constant():
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones_like(ret)
    assert explained_variance(ret, ret, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(ret, 2.5), ret, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_win_stats_ties_count_half():
    a = torch.tensor([1.0, 0.5, 0.2, 0.7])
    b = torch.tensor([0.5, 0.5, 0.9, 0.1])
    w = win_stats(a, b)
    torch.testing.assert_close(w.win, torch.tensor([1.0, 0.5, 0.0, 1.0]))
    assert w.win.mean().item() == pytest.approx(0.625)  # (1 + .5 + 0 + 1) / 4
    assert w.strict_win.mean().item() == 0.5 and w.strict_loss.mean().item() == 0.25


def test_position_ids_count_only_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    torch.testing.assert_close(position_ids_from_mask(mask), torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 0]]))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = train_tokenizer(["abcdefgh reverse:\n"])
    base = SimpleNamespace(
        arch="llama", hidden_size=16, layers=1, heads=2, intermediate_size=None, max_positions=64
    )
    lm = build_causal_lm(base, tok).eval()
    from transformers import LlamaForSequenceClassification

    rm = LlamaForSequenceClassification(
        lm.config.__class__(**{**lm.config.to_dict(), "num_labels": 1})
    ).eval()
    return tok, lm, rm


def test_reward_is_read_at_the_last_real_token_whatever_the_left_padding(tiny):
    tok, _, rm = tiny
    prompts = ["reverse: abc\n", "reverse: abcdefgh\n"]
    comps = [Completion("cba", True), Completion("hg", False)]
    together = score_last_token(rm, encode_pairs(tok, prompts, comps, 32, 8))
    alone = torch.cat(
        [score_last_token(rm, encode_pairs(tok, [p], [c], 32, 8)) for p, c in zip(prompts, comps)]
    )
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    # and it is not the score of the padding: changing a pad-side token id changes nothing
    batch = encode_pairs(tok, prompts, comps, 32, 8)
    assert batch.attention_mask[0, 0] == 0  # row 0 is left-padded


def test_policy_logprobs_do_not_depend_on_padding(tiny):
    from instructrl.plugins.hf import HFPolicy

    tok, lm, _ = tiny
    policy = HFPolicy(lm, tok)
    prompts = ["reverse: a\n", "reverse: abcdefg\n"]
    comps = [Completion("a", True), Completion("gfedcba", True)]
    together = policy.forward(encode_pairs(tok, prompts, comps, 32, 9), temperature=0.7).logprobs
    for i in range(2):
        alone = policy.forward(encode_pairs(tok, [prompts[i]], [comps[i]], 32, 9), temperature=0.7).logprobs[
            0
        ]
        n = alone.shape[0]
        torch.testing.assert_close(together[i, :n], alone, atol=1e-5, rtol=1e-5)
