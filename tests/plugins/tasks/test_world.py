"""The simulated-labeler world: determinism, disjoint splits, every verifier and the additive gold
judge by hand, the demonstration flaws, the corpus leak guarantees, the labeler."""

from __future__ import annotations

import random
import re

import pytest
from instructrl.core.errors import ConfigError
from instructrl.core.fields import validate
from instructrl.core.types import Completion, Prompt, Ranking
from instructrl.plugins.tasks.world import (
    CHATTY_LINES,
    DEMO_FLAWS,
    KINDS,
    GoldJudge,
    World,
    WorldConfig,
    corrupt,
    labeler_agreement,
    labeler_ranks,
    letter_overlap,
    levenshtein,
    order_share,
    partial,
    similarity,
    words_of,
    wrong_item,
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


def prompt(kind: str, text: str) -> Prompt:
    return Prompt("p", f"{kind}: {text}\n", {"kind": kind, "input": text, "answer": KINDS[kind](text)})


# --------------------------------------------------------------------------------------------
# Determinism and splits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["domain", "general"])
def test_deterministic_from_the_seed(style):
    a, b, c = world(corpus_style=style), world(corpus_style=style), world(corpus_style=style, seed=1)
    assert [p.text for p in a.prompts("rl")] == [p.text for p in b.prompts("rl")]
    assert [d.response for d in a.demonstrations()] == [d.response for d in b.demonstrations()]
    assert a.demo_flaws() == b.demo_flaws()
    assert a.pretraining_text("train") == b.pretraining_text("train")
    assert a.pretraining_text("eval") == b.pretraining_text("eval")
    assert [p.text for p in a.prompts("rl")] != [p.text for p in c.prompts("rl")]
    assert a.pretraining_text("train") != c.pretraining_text("train")


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


def test_default_kinds_keep_the_old_five_and_add_the_new_ones():
    assert WorldConfig().kinds == list(KINDS)
    assert list(KINDS)[:5] == ["reverse", "sort", "uppercase", "repeat", "count"]
    assert len(KINDS) >= 9
    # every default kind is drawn
    assert {p.fields["kind"] for p in world().prompts("rl")} == set(KINDS)


def test_prompt_group_is_the_instruction_kind():
    w = world()
    for p in w.prompts("eval")[:50]:
        assert w.prompt_group(p) == p.fields["kind"] == p.text.split(":")[0]
    # without fields the kind is read from the text
    assert w.prompt_group(Prompt("x", "first_last: abc\n")) == "first_last"
    with pytest.raises(ValueError, match=r"^world: prompt 'x' is not a '<kind>: <input>' instruction"):
        w.prompt_group(Prompt("x", "rot13: abc\n"))


# --------------------------------------------------------------------------------------------
# Kinds and verifiers
# --------------------------------------------------------------------------------------------


def test_answers_are_correct_for_every_kind():
    got = {k: kind("cab") for k, kind in KINDS.items()}
    assert got == {
        "reverse": "bac",
        "sort": "abc",
        "uppercase": "CAB",
        "repeat": "cabcab",
        "count": "3",
        "sort_desc": "cba",
        "largest": "c",
        "smallest": "a",
        "first_last": "cb",
        "every_other": "cb",
        "capitalize": "Cab",
    }
    assert KINDS["every_other"]("dbcaef") == "dce"
    assert KINDS["count"].answer("dbca") == "4" and KINDS["count"].name == "count"


VERIFIER_CASES = [
    # kind, input, response, credit worked out by hand
    ("reverse", "dbca", "acbd", 1.0),
    ("reverse", "dbca", "acb", 0.75),  # reversed "bca" is one deletion from "dbca": 1 − 1/4
    ("reverse", "dbca", "abcd", 0.5),  # reversed "dcba" vs "dbca": two substitutions of 4
    ("reverse", "dbca", "xyz", 0.0),
    ("sort", "dbca", "abcd", 1.0),
    ("sort", "dbca", "abdc", 2 / 3),  # all letters (1) × pairs in order ab, bd of ab bd dc (2/3)
    ("sort", "dbca", "abc", 0.75),  # 3 of 4 letters × sorted
    ("sort", "dbca", "abce", 0.75),  # e is not an input letter: 3/4 × sorted
    ("sort", "dbca", "dbca", 1 / 3),  # the copied input: letters 1 × only bc in order
    ("sort", "dbca", "dcba", 0.0),  # no pair in order
    ("sort_desc", "dbca", "dcba", 1.0),
    ("sort_desc", "dbca", "dcab", 2 / 3),  # dc, ca descend; ab does not
    ("sort_desc", "dbca", "dcb", 0.75),
    ("sort_desc", "dbca", "abcd", 0.0),
    ("uppercase", "dbca", "DBCA", 1.0),
    ("uppercase", "dbca", "DBcA", 0.75),  # the letters match (1) × 3 of 4 capitals
    ("uppercase", "dbca", "DBC", 0.75),  # one letter missing (3/4) × all capitals
    ("uppercase", "dbca", "dbca", 0.0),  # no capital
    ("capitalize", "dbca", "Dbca", 1.0),
    ("capitalize", "dbca", "dbca", 0.75),  # letters 1 × 3 of 4 characters in the right case
    ("capitalize", "dbca", "DBCA", 0.25),  # only the first character has the right case
    ("capitalize", "dbca", "Dbcx", 0.75),  # one wrong letter (3/4) × all cases right
    ("capitalize", "dbca", "Xyzw", 0.0),  # every letter wrong, however well capitalized
    ("repeat", "dbca", "dbcadbca", 1.0),
    ("repeat", "dbca", "dbcadb", 0.75),  # two deletions of 8
    ("repeat", "dbca", "dbca", 0.5),
    ("repeat", "dbca", "xyzwxyzw", 0.0),  # all eight characters wrong
    ("count", "dbca", "4", 1.0),
    ("count", "dbca", "3", 0.75),  # 1 − |3 − 4|/4
    ("count", "dbca", "6", 0.5),
    ("count", "dbca", "8", 0.0),  # clipped at 0
    ("count", "dbca", "04", 0.0),  # not a plain numeral
    ("count", "dbca", "four", 0.0),
    ("count", "dbca", "", 0.0),
    ("largest", "dbca", "d", 1.0),
    ("largest", "dbca", "c", 2 / 3),  # one of the 3 other distinct letters is later: 1 − 1/3
    ("largest", "dbca", "a", 0.0),
    ("largest", "dbca", "dc", 0.5),  # right letter, diluted by the extra character
    ("largest", "dbca", "x", 0.0),  # not an input letter
    ("largest", "dbca", "D", 0.0),
    ("largest", "aab", "a", 0.0),  # distinct letters a, b: a is the smallest
    ("largest", "aaa", "a", 1.0),
    ("smallest", "dbca", "a", 1.0),
    ("smallest", "dbca", "b", 2 / 3),
    ("smallest", "dbca", "d", 0.0),
    ("first_last", "dbca", "da", 1.0),
    ("first_last", "dbca", "d", 0.5),  # first letter right, second missing
    ("first_last", "dbca", "dab", 2 / 3),  # both positions right × 2/3 for the extra character
    ("first_last", "dbca", "dca", 1 / 3),  # only the first position right × 2/3
    ("first_last", "dbca", "ad", 0.0),
    ("every_other", "dbcaef", "dce", 1.0),
    ("every_other", "dbcaef", "dc", 2 / 3),  # the last item missing: one edit of 3
    ("every_other", "dbcaef", "dxe", 2 / 3),  # a wrong item: one substitution of 3
    ("every_other", "dbcaef", "bae", 1 / 3),  # the even positions instead: two of three wrong
    ("every_other", "dbcaef", "xyz", 0.0),
]


@pytest.mark.parametrize(("kind", "text", "response", "expected"), VERIFIER_CASES)
def test_verifiers_by_hand(kind, text, response, expected):
    assert KINDS[kind].verify(text, response) == pytest.approx(expected, abs=1e-12)


def test_every_kind_has_hand_worked_full_partial_and_zero_cases():
    for kind in KINDS:
        credits = [e for k, _, _, e in VERIFIER_CASES if k == kind]
        assert 1.0 in credits and 0.0 in credits, kind
        assert any(0 < e < 1 for e in credits), kind


def test_verifiers_give_full_credit_exactly_to_the_answer_and_stay_in_0_1():
    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice("abcdef") for _ in range(rng.randint(1, 6)))  # repeats are common
        for kind in KINDS.values():
            answer = kind(text)
            assert kind.verify(text, answer) == 1.0, (kind.name, text)
            for flawed in (corrupt(answer, rng), wrong_item(answer, text, rng), partial(answer, rng)):
                credit = kind.verify(text, flawed)
                assert 0.0 <= credit <= 1.0
                if flawed != answer:
                    assert credit < 1.0, (kind.name, text, flawed)
            junk = "".join(rng.choice("abcXY1\t ") for _ in range(rng.randint(0, 9)))
            assert 0.0 <= kind.verify(text, junk) <= 1.0


def test_levenshtein_similarity_and_the_multiset_helpers():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert similarity("abc", "abd") == pytest.approx(2 / 3)
    assert letter_overlap("aab", "abb") == pytest.approx(2 / 3)  # {a, b} shared of 3
    assert letter_overlap("", "") == 1.0 and letter_overlap("", "ab") == 0.0
    assert order_share("abca") == pytest.approx(2 / 3) and order_share("a") == 1.0
    assert order_share("cba", descending=True) == 1.0


# --------------------------------------------------------------------------------------------
# The additive gold judge
# --------------------------------------------------------------------------------------------


def test_gold_is_content_minus_format_by_hand():
    judge = GoldJudge(extra_line_penalty=0.3, missing_eos_penalty=0.5)
    p = prompt("sort", "dbca")
    cases = [
        # completion, content, format
        (Completion("abcd", True), 1.0, 0.0),
        (Completion("abcd\nhope this helps", True), 1.0, 0.3),
        (Completion("abcd", False), 1.0, 0.5),
        (Completion("abdc\nok", False), 2 / 3, 0.8),  # gold 2/3 − 0.8 = −0.1333
        (Completion("  abc ", True), 0.75, 0.0),  # the answer line is stripped
        (Completion("abcd\n  \n", True), 1.0, 0.0),  # blank lines are not an extra line
        (Completion("\nhope this helps", True), 0.0, 0.3),  # −0.3
        (Completion("", True), 0.0, 0.0),
    ]
    completions = [c for c, _, _ in cases]
    parts = judge.parts([p] * len(cases), completions)
    scores = judge.score([p] * len(cases), completions)
    assert set(parts) == {"content", "format"}
    for i, (completion, content, penalty) in enumerate(cases):
        assert parts["content"][i] == pytest.approx(content), completion
        assert parts["format"][i] == pytest.approx(penalty), completion
        assert scores[i] == parts["content"][i] - parts["format"][i]  # exactly
    assert scores[3] == pytest.approx(2 / 3 - 0.8)
    assert min(scores) == pytest.approx(-0.3)


def test_gold_uses_the_configured_penalties():
    judge = world(extra_line_penalty=0.4, missing_eos_penalty=0.25).gold
    p = prompt("count", "dbca")
    scores = judge.score([p] * 3, [Completion("3\nok"), Completion("4", False), Completion("4\nx", False)])
    assert scores == pytest.approx([0.75 - 0.4, 1 - 0.25, 1 - 0.65])


def test_the_default_gold_orders_typical_responses_sensibly():
    defaults = WorldConfig()
    assert (defaults.extra_line_penalty, defaults.missing_eos_penalty) == (0.3, 0.5)
    w = world()
    p = prompt("reverse", "dbca")  # answer acbd
    ranked = [
        Completion("acbd"),  # correct, clean: 1.0
        Completion("acbx"),  # near miss, clean: 0.75
        Completion("acbd\nhope this helps"),  # correct, chatty: 0.7
        Completion("acbd", False),  # correct, truncated: 0.5
        Completion("acbd\nhope this he", False),  # correct, chatty and truncated: 0.2
        Completion("zzzz"),  # wrong, clean: 0.0
        Completion("zzzz\nglad to help"),  # wrong, chatty: −0.3
    ]
    scores = w.gold.score([p] * len(ranked), ranked)
    assert scores == pytest.approx([1.0, 0.75, 0.7, 0.5, 0.2, 0.0, -0.3])
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)


def test_the_judge_reads_kind_and_input_from_the_text_without_fields():
    judge = world().gold
    bare = Prompt("p", "largest: dbca\n", {"answer": "d"})
    assert judge.score([bare, bare], [Completion("d"), Completion("c\nok")]) == pytest.approx(
        [1.0, 2 / 3 - 0.3]
    )
    with pytest.raises(ValueError, match=r"^world: prompt 'q' is not a '<kind>: <input>' instruction"):
        judge.score([Prompt("q", "hello")], [Completion("x")])


def test_the_judge_separates_clean_answers_from_what_sloppy_sft_produces():
    w = world()
    prompts = w.prompts("rl")[:200]
    parts = w.gold.parts(prompts, [Completion(p.fields["answer"] + "\nglad to help") for p in prompts])
    clean = w.gold.score(prompts, [Completion(p.fields["answer"]) for p in prompts])
    assert min(clean) == 1.0
    assert set(parts["content"]) == {1.0} and set(parts["format"]) == {0.3}  # the default penalty


# --------------------------------------------------------------------------------------------
# Demonstrations
# --------------------------------------------------------------------------------------------


def test_demonstration_flaw_rates_match_the_config():
    n = 3000
    w = world(
        n_demos=n,
        demo_error_rate=0.1,
        demo_partial_rate=0.15,
        demo_wrong_item_rate=0.2,
        demo_chatty_rate=0.35,
    )
    demos, flaws = w.demonstrations(), w.demo_flaws()
    assert len(flaws) == n and set(flaws) <= set(DEMO_FLAWS)
    share = {f: flaws.count(f) / n for f in DEMO_FLAWS}
    chatty = sum("\n" in d.response for d in demos) / n
    # partial applies to answers of two or more characters (count, largest, smallest have one)
    long_answers = [f for d, f in zip(demos, flaws) if len(str(d.prompt.fields["answer"])) >= 2]
    partial_long = long_answers.count("partial") / len(long_answers)
    # 4 binomial standard errors: sqrt(p(1 − p)/n) for n = 3000 (≈ 2200 long answers)
    assert abs(share["error"] - 0.10) < 4 * (0.10 * 0.90 / n) ** 0.5  # 0.022
    assert abs(share["wrong_item"] - 0.20) < 4 * (0.20 * 0.80 / n) ** 0.5  # 0.029
    assert abs(partial_long - 0.15) < 4 * (0.15 * 0.85 / len(long_answers)) ** 0.5  # ≈ 0.030
    assert abs(chatty - 0.35) < 4 * (0.35 * 0.65 / n) ** 0.5  # 0.035


def test_each_demonstration_flaw_is_what_its_label_says():
    w = world(n_demos=1500)
    for d, flaw in zip(w.demonstrations(), w.demo_flaws()):
        line = d.response.split("\n")[0]
        answer, text, kind = (str(d.prompt.fields[k]) for k in ("answer", "input", "kind"))
        credit = KINDS[kind].verify(text, line)
        if flaw == "none":
            assert line == answer and credit == 1.0
        elif flaw == "error":
            assert levenshtein(line, answer) == 1 and credit < 1.0
        elif flaw == "partial":
            assert answer.startswith(line) and 1 <= len(line) < len(answer) and 0 < credit < 1
        else:
            assert line != answer and credit < 1.0
            assert levenshtein(line, answer) == 1  # one item swapped or dropped, or a count ± 1
        if "\n" in d.response:
            assert d.response.split("\n", 1)[1] in CHATTY_LINES


def test_content_flaw_helpers_by_hand():
    rng = random.Random(3)
    assert partial("d", rng) == "d"
    cuts = {partial("acbd", rng) for _ in range(200)}
    assert cuts == {"a", "ac", "acb"}
    assert {wrong_item("4", "dbca", rng) for _ in range(200)} == {"3", "5"}
    assert {wrong_item("1", "d", rng) for _ in range(50)} <= {"0", "2"}
    swapped = {wrong_item("DBCA", "dbca", rng) for _ in range(500)}
    assert all(s.isupper() for s in swapped)  # the swapped letter keeps the item's case
    assert "BBCA" in swapped and "DCA" in swapped and "DBC" not in swapped  # never drops the last item
    assert {wrong_item("a", "aaa", rng) for _ in range(100)} <= set("bcdefghijklmnopqrstuvwxyz")


def test_rates_of_zero_give_perfect_demonstrations():
    w = world(demo_error_rate=0, demo_partial_rate=0, demo_wrong_item_rate=0, demo_chatty_rate=0)
    assert all(d.response == d.prompt.fields["answer"] for d in w.demonstrations())
    assert set(w.demo_flaws()) == {"none"}


# --------------------------------------------------------------------------------------------
# The labeler
# --------------------------------------------------------------------------------------------


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
        assert r.ranks == (0, 1, 2)  # clean 1.0 > chatty 1 − 0.3 = 0.7 > truncated 1 − 0.5 = 0.5


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
    assert w.pair_kind(p, Completion("b"), Completion("a", False)) == "clean_vs_truncated"


def test_same_format_pairs_are_decided_by_content_alone():
    w = world()
    p = prompt("sort", "dbca")
    a, b = Completion("abcd\nok"), Completion("abdc\nok")
    assert w.pair_kind(p, a, b) == "same_format"
    ga, gb = w.gold.score([p, p], [a, b])
    assert ga - gb == pytest.approx(1 - 2 / 3)  # the format penalties cancel


# --------------------------------------------------------------------------------------------
# The pretraining corpus
# --------------------------------------------------------------------------------------------

INSTRUCTION_LINE = re.compile(r"^\s*[A-Za-z_]+\s*:", re.MULTILINE)


@pytest.mark.parametrize("style", ["domain", "general"])
def test_no_corpus_document_contains_a_prompt_or_the_instruction_format(style):
    w = world(corpus_style=style, n_pretrain_docs=2000)
    docs = w.pretraining_text("train") + w.pretraining_text("eval")
    prompt_lines = {p.text.strip() for split in w._splits.values() for p in split}
    assert {p.text.strip() for p in w.prompts("rl") + w.prompts("eval")} <= prompt_lines
    for d in docs:
        assert not INSTRUCTION_LINE.search(d), d
        assert ":" not in d, d
        assert not any(line.strip() in prompt_lines for line in d.split("\n")), d
    for kind in KINDS:
        assert not any(f"{kind}:" in d for d in docs), kind
    alphabet = set("".join(docs))
    assert set("abcdefghijklmnopqrstuvwxyz") <= alphabet and set("0123456789") <= alphabet


def test_the_domain_corpus_never_shows_a_prompt_input_so_never_an_answer_next_to_it():
    w = world(n_pretrain_docs=2000)
    docs = w.pretraining_text("train") + w.pretraining_text("eval")
    inputs = {str(p.fields["input"]) for split in w._splits.values() for p in split}
    pairs = {(str(p.fields["input"]), str(p.fields["answer"])) for s in w._splits.values() for p in s}
    for d in docs:
        words = words_of(d)
        assert not inputs & set(words), d
        for a, b in zip(words, words[1:]):
            assert (a, b) not in pairs
    # the general corpus does state string facts in prose, just never the instruction format
    general = world(corpus_style="general", n_pretrain_docs=2000).pretraining_text("train")
    assert any(" backwards is " in d for d in general)
    assert not any(" backwards is " in d for d in docs)


def test_the_domain_corpus_talks_about_the_instruction_domain():
    domain = world(n_pretrain_docs=1000).pretraining_text("train")
    general = world(corpus_style="general", n_pretrain_docs=1000).pretraining_text("train")

    def share(docs: list[str], word: str) -> float:
        return sum(word in words_of(d) for d in docs) / len(docs)

    for word in ("alphabet", "letter", "reverse", "capital"):
        assert share(domain, word) > 0.01 and share(domain, word) > share(general, word), word
    assert any(c.isupper() for c in "".join(domain))
    lexicon_only = world(corpus_domain_rate=0.0, n_pretrain_docs=300).pretraining_text("train")
    assert share(lexicon_only, "alphabet") == 0.0


# --------------------------------------------------------------------------------------------
# Config validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"k": 1}, r"^task\.k must be >= 2 \(got 1\)$"),
        (
            {"kinds": ["reverse", "rot13"]},
            r"^task\.kinds must be a non-empty list of reverse, sort, .*capitalize",
        ),
        ({"kinds": []}, r"^task\.kinds must be a non-empty list"),
        ({"labeler_temperature": 0}, r"^task\.labeler_temperature must be > 0"),
        ({"demo_chatty_rate": 1.5}, r"^task\.demo_chatty_rate must be in \[0, 1\]"),
        ({"demo_partial_rate": -0.1}, r"^task\.demo_partial_rate must be in \[0, 1\] \(got -0\.1\)$"),
        ({"demo_wrong_item_rate": 2}, r"^task\.demo_wrong_item_rate must be in \[0, 1\]"),
        ({"corpus_domain_rate": 1.1}, r"^task\.corpus_domain_rate must be in \[0, 1\]"),
        (
            {"demo_partial_rate": 0.6, "demo_wrong_item_rate": 0.5},
            r"^task\.demo_error_rate \+ demo_partial_rate \+ demo_wrong_item_rate must be <= 1 \(got 1\.2\)$",
        ),
        ({"extra_line_penalty": -0.1}, r"^task\.extra_line_penalty must be >= 0 \(got -0\.1\)$"),
        ({"missing_eos_penalty": -1}, r"^task\.missing_eos_penalty must be >= 0 \(got -1"),
        ({"corpus_style": "news"}, r"^task\.corpus_style: Invalid value 'news'"),
        (
            {"missing_eos_factor": 0.5},
            r"^task\.missing_eos_factor: unknown key .*did you mean 'missing_eos_penalty'",
        ),
        ({"min_len": 5, "max_len": 3}, r"^task\.min_len must be >= 1 and <= max_len"),
        ({"min_len": 1, "max_len": 1, "n_rl_prompts": 1000}, r"^task\.n_demos \+ n_rank_prompts"),
    ],
)
def test_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        validate(WorldConfig, {**SMALL, **data}, "task")


def test_post_init_checks_corpus_style_when_built_directly():
    with pytest.raises(ValueError, match=r"^corpus_style must be 'general' or 'domain' \(got 'news'\)$"):
        WorldConfig(corpus_style="news")  # type: ignore[arg-type]


def test_penalties_above_one_are_allowed():
    w = world(extra_line_penalty=1.5)
    p = prompt("reverse", "abc")
    assert w.gold.score([p], [Completion("cba\nok")]) == [pytest.approx(-0.5)]
