"""Real data through the Task seam: each format parsed; each bad row named by file and line."""

from __future__ import annotations

import json

import pytest
from instructrl.core.errors import ConfigError, DataError
from instructrl.core.fields import validate
from instructrl.plugins.tasks.jsonl import JsonlConfig, JsonlTask


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def task(**files):
    return JsonlTask(validate(JsonlConfig, files, "task"))


def test_trl_formats_and_ranked_lists(tmp_path):
    demos = jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "q1", "completion": "a1"}, {"prompt": "q2", "completion": "a2", "topic": "x"}],
    )
    comps = jsonl(
        tmp_path / "c.jsonl",
        [
            {"prompt": "q", "chosen": "good", "rejected": "bad"},
            {"prompt": "q", "responses": ["best", "mid", "worst"]},
            {"prompt": "q", "responses": ["a", "b", "c"], "ranks": [0, 1, 1]},
        ],
    )
    t = task(demonstrations=demos, comparisons=comps, rank_eval_fraction=0.0, eval_fraction=0.5)
    assert [(d.prompt.text, d.response) for d in t.demonstrations()] == [("q1", "a1"), ("q2", "a2")]
    assert t.demonstrations()[1].prompt.fields == {"topic": "x"}
    ranks = [r.ranks for r in t.rankings("train", sample=None)]
    assert ranks == [(0, 1), (0, 1, 2), (0, 1, 1)]
    assert [len(r.pairs()) for r in t.rankings("train", None)] == [1, 3, 2]
    rl, held = t.prompts("rl"), t.prompts("eval")
    assert len(rl) == 1 and len(held) == 1 and rl[0].text != held[0].text
    assert t.gold is None


def test_plain_text_pretraining_is_split_on_blank_lines(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("first doc\nstill first\n\nsecond doc\n\n\nthird doc\n")
    t = task(pretraining=str(text), pretrain_eval_fraction=0.0)
    assert t.pretraining_text("train") == ["first doc\nstill first", "second doc", "third doc"]
    jl = jsonl(tmp_path / "p.jsonl", [{"text": "one"}, {"text": "two"}])
    assert task(pretraining=jl, pretrain_eval_fraction=0.0).pretraining_text("train") == ["one", "two"]


@pytest.mark.parametrize(
    ("rows", "key", "message"),
    [
        (
            ['{"prompt": "q", "completion": "a"}', "{not json"],
            "demonstrations",
            r"d\.jsonl:2: malformed JSON",
        ),
        (
            [{"prompt": "q"}],
            "demonstrations",
            r"d\.jsonl:1: missing key 'completion' \(keys present: prompt\)",
        ),
        (
            [{"prompt": "q", "completion": 3}],
            "demonstrations",
            r"d\.jsonl:1: 'completion' must be a string, got int",
        ),
        (
            [{"prompt": [{"role": "user", "content": "hi"}], "completion": "a"}],
            "demonstrations",
            r"d\.jsonl:1: 'prompt' is a list of messages; conversational format is not supported yet",
        ),
        ([{"prompt": "q", "completion": "  "}], "demonstrations", r"d\.jsonl:1: 'completion' is empty"),
        (
            [{"prompt": "q", "responses": ["only one"]}],
            "comparisons",
            r"d\.jsonl:1: 'responses' must be a list of at least 2 strings",
        ),
        ([{"prompt": "q", "chosen": "a"}], "comparisons", r"d\.jsonl:1: missing key 'rejected'"),
        (
            [{"prompt": "q", "answer": "a"}],
            "comparisons",
            r"d\.jsonl:1: expected 'chosen' and 'rejected', or 'responses'",
        ),
        (
            [{"prompt": "q", "responses": ["a", "b"], "ranks": [0, 0]}],
            "comparisons",
            r"d\.jsonl:1: every response ties",
        ),
        (["[1, 2]"], "demonstrations", r"d\.jsonl:1: expected a JSON object, got list"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, rows, key, message):
    """Caught when the config is validated (every row is read then), not when a stage asks."""
    path = jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=rf"^task\.{key}: .*{message}") as err:
        task(**{key: path})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("key", "raw", "message"),
    [
        (
            "demonstrations",
            b"",
            r"d\.jsonl: no rows; expected one JSON object per line with 'prompt' and 'completion'",
        ),
        ("prompts", b"\n  \n", r"d\.jsonl: no rows"),
        (
            "demonstrations",
            b'{"prompt": "q", "completion": "a"}\n{"prompt": "caf\xe9"}\n',
            r"d\.jsonl:2: not UTF-8",
        ),
        (
            "comparisons",
            b'{"prompt": "q", "chosen": "x", "rejected": "x"}\n',
            r"d\.jsonl:1: 'chosen' and 'rejected' are the same text",
        ),
        (
            "comparisons",
            b'{"prompt": "q", "responses": ["a", "b", "a"], "ranks": [0, 1, 2]}\n',
            r"d\.jsonl:1: responses\[0\] and responses\[2\] are the same text ranked differently",
        ),
        (
            "comparisons",
            b'{"prompt": "q", "responses": ["a", "b"], "ranks": [true, false]}\n',
            r"d\.jsonl:1: 'ranks' must be",
        ),
        (
            "comparisons",
            b'{"prompt": "q", "responses": ["a", 3]}\n',
            r"d\.jsonl:1: 'responses\[1\]' must be a string",
        ),
        ("eval_prompts", b'{"prompt": ""}\n', r"d\.jsonl:1: 'prompt' is empty"),
        ("pretraining", b"\n\n \n", r"d\.jsonl: no rows; expected one JSON object per line with 'text'"),
    ],
)
def test_empty_files_encodings_and_unusable_rows_are_caught_at_validation(tmp_path, key, raw, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(raw)
    with pytest.raises(DataError, match=rf"^task\.{key}: .*{message}"):
        task(**{key: str(path)})


def test_plain_text_files_name_the_line_of_a_bad_byte_and_reject_empty_text(tmp_path):
    bad = tmp_path / "corpus.txt"
    bad.write_bytes(b"one\n\ntwo\nthr\xffee\n")
    with pytest.raises(DataError, match=r"^task\.pretraining: .*corpus\.txt:4: not UTF-8 text \(byte 0xff\)"):
        task(pretraining=str(bad))
    bad.write_text("\n \n\t\n")
    with pytest.raises(DataError, match=r"corpus\.txt: no text"):
        task(pretraining=str(bad))
    bad.write_bytes("\ufeffdoc one\r\n\r\ndoc two\r\n".encode())  # BOM and CRLF are fine
    assert task(pretraining=str(bad), pretrain_eval_fraction=0.0).pretraining_text("train") == [
        "doc one",
        "doc two",
    ]


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^task\.demonstrations: file not found: .*nope\.jsonl$"):
        validate(JsonlConfig, {"demonstrations": str(tmp_path / "nope.jsonl")}, "task")


def test_a_stage_without_its_file_says_which_key(tmp_path):
    t = task()
    with pytest.raises(DataError, match=r"task\.comparisons: the rm stage needs this file"):
        t.rankings("train", None)
