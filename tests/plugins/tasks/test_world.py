"""The simulated-labeler world: determinism, disjoint splits, the gold judge by hand, the labeler."""

from __future__ import annotations

import random

import pytest
from instructrl.core.fields import validate
from instructrl.core.errors import ConfigError
from instructrl.core.types import Completion, Prompt, Ranking
from instructrl.plugins.tasks.world import (
    KINDS,
    GoldJudge,
    World,
    WorldConfig,
    labeler_agreement,
    labeler_ranks,
    levenshtein,
    similarity,
)

SMALL = {
    "n_demos": 300,
    "n_rank_prompts": 100,
    "n_rank_eval_prompts": 50,
    "n_rl_prompts": 400,
    "n_eval_prompts": 200,
    "n_pretrain_docs": 50,
    "n_pretrain_eval_docs": 10,
}


def world(**overrides) -> World:
    return World(validate(WorldConfig, {**SMALL, **overrides}, "task"))


def test_deterministic_from_the_seed():
    a, b, c = world(), world(), world(seed=1)
    assert [p.text for p in a.prompts("rl")] == [p.text for p in b.prompts("rl")]
    assert [d.response for d in a.demonstrations()] == [d.response for d in b.demonstrations()]
    assert a.pretraining_text("train") == b.pretraining_text("train")
    assert [p.text for p in a.prompts("rl")] != [p.text for p in c.prompts("rl")]


def test_held_out_prompts_are_in_no_training_stream():
    w = world()
    eval_texts = {p.text for p in w.prompts("eval")}
    streams = {
        "rl": {p.text for p in w.prompts("rl")},
        "demos": {d.prompt.text for d in w.demonstrations()},
        "rank": {p.text for p in w._splits["rank"]},
        "rank_eval": {p.text for p in w._splits["rank_eval"]},
    }
    assert len(eval_texts) == 200
    for name, texts in streams.items():
        assert not (eval_texts & texts), name
    assert not (streams["rank"] & streams["rank_eval"])
    assert not (streams["demos"] & streams["rl"])
    # the held-out set does not move when a training stream is resized
    assert [p.text for p in world(n_rl_prompts=10).prompts("eval")] == [p.text for p in w.prompts("eval")]


def test_answers_are_correct_for_every_kind():
    p = {k: fn("cab") for k, fn in KINDS.items()}
    assert p == {"reverse": "bac", "sort": "abc", "uppercase": "CAB", "repeat": "cabcab", "count": "3"}


def test_gold_judge_by_hand():
    judge = GoldJudge(extra_line_penalty=0.4, missing_eos_factor=0.5)
    prompt = Prompt("p", "reverse: abcdef\n", {"answer": "fedcba"})
    cases = [
        (Completion("fedcba", True), 1.0),  # exact
        (Completion("fedcba\nhope this helps", True), 0.6),  # 1 × (1 − 0.4)
        (Completion("fedcba", False), 0.5),  # truncated: × 0.5
        (Completion("fedcbx", True), 1 - 1 / 6),  # one substitution of 6 → 0.8333
        (Completion("fedcbaxx", True), 1 - 2 / 8),  # two trailing junk chars on the line → 0.75
        (
            Completion("fedc\nok", False),
            (1 - 2 / 6) * 0.6 * 0.5,
        ),  # two deletions, extra line, truncated → 0.2
        (Completion("", True), 0.0),
    ]
    scores = judge.score([prompt] * len(cases), [c for c, _ in cases])
    for (completion, expected), got in zip(cases, scores):
        assert got == pytest.approx(expected), completion


def test_levenshtein_and_similarity():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert similarity("abc", "abd") == pytest.approx(2 / 3)


def test_demonstration_error_and_chatty_rates_match_the_config():
    w = world(n_demos=2000, demo_error_rate=0.1, demo_chatty_rate=0.35)
    demos = w.demonstrations()
    chatty = sum("\n" in d.response for d in demos) / len(demos)
    wrong = sum(d.response.split("\n")[0] != d.prompt.fields["answer"] for d in demos) / len(demos)
    # binomial standard errors: sqrt(.35·.65/2000) = 0.0107, sqrt(.1·.9/2000) = 0.0067 → 4 SE bounds
    assert abs(chatty - 0.35) < 0.043
    assert abs(wrong - 0.10) < 0.027


def test_labeler_follows_gold_when_noise_vanishes_and_ties_equal_scores():
    rng = random.Random(0)
    ranks = labeler_ranks([0.2, 0.9, 0.5, 0.9], ["a", "b", "c", "d"], rng, temperature=1e-6, tie_margin=0.0)
    assert ranks == [2, 0, 1, 0]  # the two 0.9s tie; then 0.5; then 0.2
    same_text = labeler_ranks([0.3, 0.3], ["x", "x"], rng, 1.0, 0.0)
    assert same_text == [0, 0]


def test_bradley_terry_pairwise_probability():
    # P(a ≻ b) = σ((0.6 − 0.4)/0.1) = σ(2) = 0.8808
    rng = random.Random(1)
    wins = sum(labeler_ranks([0.6, 0.4], ["a", "b"], rng, 0.1, 0.0) == [0, 1] for _ in range(4000))
    assert abs(wins / 4000 - 0.8808) < 0.02


def test_rankings_call_sample_once_and_drop_all_tie_prompts():
    w = world(n_rank_prompts=20, k=3, labeler_temperature=1e-6)
    calls = []

    def sample(prompts, k):
        calls.append((len(prompts), k))
        out = []
        for i, p in enumerate(prompts):
            answer = p.fields["answer"]
            if i % 2:  # all three identical: the prompt carries no preference
                out.append([Completion(answer)] * 3)
            else:
                out.append([Completion(answer), Completion(answer + "\nok"), Completion(answer, False)])
        return out

    rankings = w.rankings("train", sample)
    assert calls == [(20, 3)]
    assert len(rankings) == 10
    for r in rankings:
        assert r.ranks == (0, 2, 1)  # clean 1.0 > truncated 0.5 > chatty 1 × (1 − 0.7) = 0.3


def test_labeler_agreement_closed_form():
    p = Prompt("p", "x")
    r = Ranking(p, (Completion("a"), Completion("b"), Completion("c")), (0, 1, 1))
    # gold (3, 2, 1): pairs (a,b) agree, (a,c) agree, (b,c) labeler tie → ½ → (1 + 1 + .5)/3
    assert labeler_agreement([r], [[3.0, 2.0, 1.0]]) == pytest.approx(2.5 / 3)


def test_pair_kinds():
    w = world()
    p = w.prompts("rl")[0]
    assert w.pair_kind(p, Completion("a"), Completion("b")) == "same_format"
    assert w.pair_kind(p, Completion("a\nhi"), Completion("b")) == "clean_vs_extra_line"
    assert w.pair_kind(p, Completion("a", False), Completion("b\nhi")) == "extra_line_vs_truncated"


def test_pretraining_text_never_shows_the_instruction_format():
    w = world(n_pretrain_docs=2000)
    docs = w.pretraining_text("train")
    for kind in KINDS:
        assert not any(f"{kind}:" in d for d in docs), kind
    assert all(":" not in d for d in docs)
    alphabet = set("".join(docs))
    assert set("abcdefghijklmnopqrstuvwxyz") <= alphabet and set("0123456789") <= alphabet


def test_the_judge_separates_clean_answers_from_what_sloppy_sft_produces():
    w = world()
    prompts = w.prompts("rl")[:200]
    judge = w.gold
    clean = judge.score(prompts, [Completion(p.fields["answer"]) for p in prompts])
    chatty = judge.score(prompts, [Completion(p.fields["answer"] + "\nglad to help") for p in prompts])
    assert min(clean) == 1.0 and max(chatty) == pytest.approx(1 - 0.7)  # the default extra_line_penalty


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"k": 1}, r"^task\.k must be >= 2 \(got 1\)$"),
        ({"kinds": ["reverse", "rot13"]}, r"^task\.kinds must be a non-empty list of reverse, sort"),
        ({"labeler_temperature": 0}, r"^task\.labeler_temperature must be > 0"),
        ({"demo_chatty_rate": 1.5}, r"^task\.demo_chatty_rate must be in \[0, 1\]"),
        ({"min_len": 5, "max_len": 3}, r"^task\.min_len must be >= 1 and <= max_len"),
        ({"min_len": 1, "max_len": 1, "n_rl_prompts": 1000}, r"^task\.n_demos \+ n_rank_prompts"),
    ],
)
def test_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        validate(WorldConfig, {**SMALL, **data}, "task")
