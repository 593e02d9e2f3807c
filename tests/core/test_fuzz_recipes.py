"""Fuzzing the bundled recipes under ``--dry-run``: random keys, types, deletions and YAML damage.

Every mutation (seeded, so the same cases every run) either validates (exit 0) or exits 2 with
exactly one line naming the mutated key or the recipe file — never a traceback, never exit 1.
"""

from __future__ import annotations

import random
import time

import pytest
import yaml
from instructrl.core.cli import main
from instructrl.core.config import bundled_recipes, load_recipe

SEED = 20240611
N_OVERRIDES = 200
N_FILES = 100

VALUES = [
    "0", "1", "-1", "2", "3", "7", "1000000000000", "0.5", "-0.5", "1e-9", "nan", "inf", "-inf",
    "true", "false", "null", "''", "abc", "ppo", "gae", "[]", "[1, 2]", "[rl]", "{}", "{a: 1}",
    "{name: x}", "@sft", "@rm", "@nope", "/nonexistent/dir", "${seed}", "${nope}", "[", "{", "'x",
    "1_000", "0x10", "~", "a b", "@", "???",
]  # fmt: skip


def flatten(tree, prefix=""):
    """Dotted paths of every mapping key (lists are leaves)."""
    out = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        out.append(path)
        if isinstance(value, dict):
            out += flatten(value, f"{path}.")
    return out


def typo(rng, word):
    if len(word) < 2:
        return word + "x"
    i = rng.randrange(len(word))
    return rng.choice([word[:i] + word[i + 1 :], word[:i] + "x" + word[i:], word + "s"])


def names(message, key, path=None):
    """The one line names the mutated key (itself, a parent, its leaf) or the recipe file."""
    parts = key.split(".")
    candidates = {".".join(parts[: i + 1]) for i in range(len(parts))} | {parts[-1]}
    if path is not None:
        candidates.add(path.name)
    return any(c and c in message for c in candidates)


def check(capsys, argv, key, path=None):
    try:
        code = main(argv)
    except SystemExit as exc:  # pragma: no cover - main never exits
        pytest.fail(f"main raised SystemExit({exc.code}) for {argv}")
    out, err = capsys.readouterr()
    lines = [line for line in err.strip().splitlines() if line]
    assert "Traceback" not in err, (argv, err)
    assert code in (0, 2), (argv, code, err)
    if code == 0:
        assert "valid; nothing was written" in out, (argv, out)
        return "ok"
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    assert names(lines[0], key, path), (argv, key, lines[0])
    return "bad"


@pytest.fixture(scope="module")
def recipes():
    """``{name: (path, every dotted key of the validated recipe)}``."""
    out = {}
    for name, path in bundled_recipes().items():
        keys = flatten(load_recipe(name, smoke=True).plain())
        out[name] = (path, [k for k in keys if not k.startswith(("provenance", "extends", "smoke"))])
    return out


def override_cases(rng, recipes):
    for _ in range(N_OVERRIDES):
        name = rng.choice(sorted(recipes))
        keys = recipes[name][1]
        key = rng.choice(keys)
        how = rng.random()
        if how < 0.15:
            key = typo(rng, key)
        elif how < 0.25:
            key = f"{key}.{rng.choice(['x', 'name', '0'])}"
        yield name, key, f"{key}={rng.choice(VALUES)}"


def test_fuzzed_overrides_exit_0_or_2_with_one_line_naming_the_key(capsys, recipes):
    rng = random.Random(SEED)
    start = time.perf_counter()
    seen = {"ok": 0, "bad": 0}
    for name, key, item in override_cases(rng, recipes):
        seen[check(capsys, ["run", name, "--smoke", "--dry-run", item], key)] += 1
    assert seen["ok"] > 10 and seen["bad"] > 50, seen  # the fuzzer reaches both outcomes
    assert time.perf_counter() - start < 60


def set_path(tree, parts, value):
    for p in parts[:-1]:
        if not isinstance(tree.get(p), dict):
            tree[p] = {}
        tree = tree[p]
    tree[parts[-1]] = value


def del_path(tree, parts):
    for p in parts[:-1]:
        tree = tree.get(p)
        if not isinstance(tree, dict):
            return
    tree.pop(parts[-1], None)


def enclosing_key(text, cut):
    """The top-level key whose block holds position ``cut`` (what damage there can corrupt)."""
    lines = text[:cut].split("\n")
    for line in reversed(lines):
        if line[:1] not in ("", " ", "\t", "#", "-") and ":" in line:
            return line.split(":")[0].strip()
    return "extends"


def damage(rng, text, cut):
    """YAML damage: truncation, an unbalanced bracket, a tab, a stray byte, an empty file …"""
    kind = rng.randrange(7)
    if kind == 0:
        return text[:cut].encode()
    if kind == 1:
        return (text[:cut] + rng.choice(["[", "{", "]", ": :", "- x\n", "'"]) + text[cut:]).encode()
    if kind == 2:
        return (text[:cut] + "\n\tkey: 1\n" + text[cut:]).encode()
    if kind == 3:
        return text[:cut].encode() + bytes([rng.choice([0x80, 0xE9, 0xFF, 0xC3])]) + text[cut:].encode()
    if kind == 4:
        return rng.choice([b"", b"# nothing\n", b"\n\n", b"- a\n- b\n", b"42\n", b"~\n"])
    if kind == 5:
        return (text[:cut] + "\n  " + text[cut:]).encode()
    return (text + "\n" + text).encode()  # duplicate keys (YAML keeps the last)


def file_cases(rng, recipes, tmp_path):
    for i in range(N_FILES):
        name = rng.choice(sorted(recipes))
        src, keys = recipes[name]
        text = src.read_text()
        tree = yaml.safe_load(text)
        path = tmp_path / f"r{i}.yaml"
        kind = rng.random()
        if kind < 0.3:
            cut = rng.randrange(len(text) + 1)
            data, key = damage(rng, text, cut), enclosing_key(text, cut)
        else:
            key = rng.choice(flatten(tree) or keys)
            if kind < 0.5:
                del_path(tree, key.split("."))
            elif kind < 0.7:
                key = rng.choice(keys) if rng.random() < 0.5 else typo(rng, key)
                set_path(
                    tree, key.split("."), yaml.safe_load(rng.choice(["1", "x", "[1]", "{a: 1}", "null"]))
                )
            else:
                set_path(
                    tree,
                    key.split("."),
                    rng.choice(
                        [0, -1, 0.0, "x", True, None, [], {}, [1], {"x": 1}, 1e30, "???", float("nan")]
                    ),
                )
            data = yaml.safe_dump(tree).encode()
        path.write_bytes(data)
        yield path, key


def test_fuzzed_recipe_files_exit_0_or_2_with_one_line_naming_the_key_or_file(capsys, recipes, tmp_path):
    rng = random.Random(SEED + 1)
    seen = {"ok": 0, "bad": 0}
    for path, key in file_cases(rng, recipes, tmp_path):
        seen[check(capsys, ["run", str(path), "--smoke", "--dry-run"], key, path)] += 1
    assert seen["ok"] > 5 and seen["bad"] > 30, seen
