"""Your own data through the Task seam: JSONL files in TRL's formats, ranked lists, plain text.

- ``demonstrations``: ``{"prompt": str, "completion": str}`` per line (TRL prompt/completion).
- ``comparisons``: ``{"prompt", "chosen", "rejected"}`` (TRL preference) **or** a ranked list
  ``{"prompt", "responses": [best, ..., worst]}`` with optional ``"ranks": [0, 1, 1, 2]`` (ties).
- ``prompts`` / ``eval_prompts``: ``{"prompt": str, ...}``; the other fields reach callable reward
  functions as keyword arguments.
- ``pretraining``: ``.txt`` (documents separated by blank lines) or ``.jsonl`` with ``"text"``.

Every file is read and every row checked when the recipe is validated (``--dry-run`` included),
and the files each planned stage needs are checked to be set (``JsonlConfig.check_recipe``, declared as ``Needs(check=...)``): a bad
row is a one-line error naming the file and line and what would be valid, before anything trains.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instructrl.core.errors import DataError
from instructrl.core.fields import param
from instructrl.core.hookspecs import Register, hookimpl
from instructrl.core.protocols import SampleFn
from instructrl.core.registry import BuildContext
from instructrl.core.types import Completion, Demonstration, Needs, Prompt, Ranking

if TYPE_CHECKING:
    from instructrl.core.config import Recipe

FILE_KEYS = ("demonstrations", "comparisons", "prompts", "eval_prompts", "pretraining")


@dataclass
class JsonlConfig:
    demonstrations: str | None = param(None, "SFT data: JSONL with prompt/completion.")
    comparisons: str | None = param(
        None, "RM data: JSONL with prompt/chosen/rejected, or prompt/responses (best first) [+ ranks]."
    )
    prompts: str | None = param(
        None,
        "RL prompts: JSONL with prompt (+ any fields for reward functions); null = the demonstrations' prompts.",
    )
    eval_prompts: str | None = param(
        None, "Held-out prompts; null = a held-out fraction (eval_fraction) of the RL prompts."
    )
    pretraining: str | None = param(
        None, "Plain text for pretraining and ptx: .txt (blank-line separated) or .jsonl with text."
    )
    eval_fraction: float = param(
        0.1, "Share of the RL prompts held out for evaluation when eval_prompts is null."
    )
    rank_eval_fraction: float = param(0.1, "Share of the comparisons held out for the RM's accuracy.")
    pretrain_eval_fraction: float = param(
        0.05, "Share of the pretraining documents held out for the LM-loss measurement."
    )
    seed: int = param(0, "Seed of the held-out splits.")

    def __post_init__(self) -> None:
        for key in FILE_KEYS:
            value = getattr(self, key)
            if value is not None and Path(value).is_dir():
                raise ValueError(f"{key}: is a directory, not a file: {value}")
            if value is not None and not Path(value).is_file():
                raise ValueError(f"{key}: file not found: {value}")
        for key in ("eval_fraction", "rank_eval_fraction", "pretrain_eval_fraction"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key} must be in [0, 1) (got {getattr(self, key)})")
        # Every row of every file is read and checked now (validation, --dry-run), not when a
        # stage first asks for it: a bad row names its file and line before anything trains.
        for key in PARSERS:
            path = getattr(self, key)
            if path is not None:
                try:
                    parsed(key, path)
                except DataError as exc:
                    raise DataError(f"{key}: {exc}") from None

    def check_recipe(self, recipe: Recipe, stages: Sequence[str]) -> None:
        """What the run's stages read (``stages``: those that run or come from the cache) is
        configured and non-empty after the held-out splits; a ValueError names the key to set."""
        task = JsonlTask(self)
        planned = set(stages)
        extra = {c.name for c in recipe.extra_losses}
        demos = "demonstrations: the {stage} needs demonstrations; set task.demonstrations=path/to/demos.jsonl (prompt/completion per line)"
        if "pretrain" in planned:
            if self.pretraining is None:
                raise ValueError(
                    "pretraining: the pretrain stage needs plain text; set task.pretraining=path/to/text.txt "
                    "(or base.model=an HF model dir to skip pretraining)"
                )
            if self.demonstrations is None:
                raise ValueError(demos.format(stage="pretrain stage (its tokenizer sees their text)"))
        if "sft" in planned:
            if self.demonstrations is None:
                raise ValueError(demos.format(stage="sft stage"))
            if len(task.demonstrations()) < 2:
                raise ValueError(
                    f"demonstrations: the sft stage needs at least 2 rows; {self.demonstrations} has "
                    f"{len(task.demonstrations())}"
                )
        if "rm" in planned:
            if self.comparisons is None:
                raise ValueError(
                    "comparisons: the rm stage needs rankings; set task.comparisons=path/to/comparisons.jsonl "
                    "(prompt/chosen/rejected, or prompt/responses best first)"
                )
            if self.demonstrations is None:
                raise ValueError(demos.format(stage="rm stage (it scores them for demo_bias)"))
            train, _ = task._all_rankings()
            if not train:
                raise ValueError(
                    f"comparisons: no rankings left to train on after holding out rank_eval_fraction="
                    f"{self.rank_eval_fraction} of {self.comparisons}"
                )
        if planned & {"rl", "eval"}:
            if self.prompts is None and self.demonstrations is None:
                raise ValueError(
                    "prompts: the rl and eval stages need prompts; set task.prompts=path/to/prompts.jsonl "
                    "(or task.demonstrations, whose prompts are reused)"
                )
            rl, held = task._prompt_splits()
            if "rl" in planned and not rl:
                source = self.prompts or self.demonstrations
                raise ValueError(
                    f"prompts: no RL prompts left in {source} after holding out the evaluation prompts "
                    "(every prompt is held out); add prompts or lower task.eval_fraction"
                )
            if not held:
                fix = (
                    "task.eval_prompts"
                    if self.eval_prompts
                    else "task.eval_prompts=path, or raise task.eval_fraction"
                )
                raise ValueError(
                    f"eval_prompts: no held-out evaluation prompts ({len(rl)} RL prompts, eval_fraction="
                    f"{self.eval_fraction} holds out none); set {fix}"
                )
        if "ptx" in extra and "rl" in planned:
            if self.pretraining is None:
                raise ValueError(
                    "pretraining: ptx needs pretraining text; set task.pretraining=path/to/text.txt "
                    "(or switch ptx off with ptx.coef=0)"
                )
            if not task.pretraining_text("train"):
                raise ValueError(
                    f"pretraining: ptx needs pretraining text, and {self.pretraining} leaves no document "
                    "after the held-out split (pretrain_eval_fraction)"
                )


def _decode(path: str, raw: bytes) -> str:
    """UTF-8 text (a leading BOM dropped); a DataError naming the line of a byte that is not."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"
        ) from None


def read_text(path: str) -> str:
    """The whole file as UTF-8 text; a DataError when it cannot be read."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return _decode(path, raw)


def read_jsonl(path: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of every non-blank line; malformed JSON names the line."""
    rows = []
    for n, line in enumerate(read_text(path).split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{n}: malformed JSON ({exc.msg}); expected one JSON object per line"
            ) from None
        except RecursionError:
            raise DataError(f"{path}:{n}: malformed JSON (nested too deeply)") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        rows.append((n, obj))
    return rows


def read_rows(path: str, expected: str) -> list[tuple[int, dict[str, Any]]]:
    """:func:`read_jsonl`, and a DataError when the file has no rows (``expected``: their keys)."""
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: no rows; expected one JSON object per line with {expected}")
    return rows


def text_field(path: str, n: int, row: dict[str, Any], key: str, allow_empty: bool = False) -> str:
    """``row[key]`` as a string, or a DataError naming file, line and key."""
    if key not in row:
        raise DataError(f"{path}:{n}: missing key '{key}' (keys present: {', '.join(sorted(row)) or 'none'})")
    value = row[key]
    if isinstance(value, list):
        raise DataError(
            f"{path}:{n}: '{key}' is a list of messages; conversational format is not supported yet, use a plain string"
        )
    if not isinstance(value, str):
        raise DataError(f"{path}:{n}: '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{path}:{n}: '{key}' is empty")
    return value


def split_held_out(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Deterministic ``(train, held_out)`` split."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n = int(round(len(items) * fraction))
    held = sorted(order[:n])
    keep = sorted(order[n:])
    return [items[i] for i in keep], [items[i] for i in held]


class JsonlTask:
    """A Task over your files (no gold judge)."""

    gold = None

    def __init__(self, config: JsonlConfig) -> None:
        self.config = config
        self._cache: dict[str, Any] = {}

    def _need(self, key: str, stage: str) -> str:
        value = getattr(self.config, key)
        if value is None:
            raise DataError(f"task.{key}: the {stage} needs this file (task.{key}=path/to/file)")
        return value

    def demonstrations(self) -> list[Demonstration]:
        """prompt/completion rows."""
        if "demos" not in self._cache:
            self._cache["demos"] = parsed("demonstrations", self._need("demonstrations", "sft stage"))
        return self._cache["demos"]

    def _all_rankings(self) -> tuple[list[Ranking], list[Ranking]]:
        if "rankings" not in self._cache:
            out = parsed("comparisons", self._need("comparisons", "rm stage"))
            self._cache["rankings"] = split_held_out(out, self.config.rank_eval_fraction, self.config.seed)
        return self._cache["rankings"]

    def rankings(self, split: str, sample: SampleFn) -> list[Ranking]:
        """Ranked responses from the file (``sample`` is not used)."""
        train, held = self._all_rankings()
        return {"train": train, "eval": held}[split]

    def _prompt_splits(self) -> tuple[list[Prompt], list[Prompt]]:
        if "prompts" not in self._cache:
            if self.config.prompts is not None:
                rl = parsed("prompts", self.config.prompts)
            elif self.config.demonstrations is not None:
                rl = [d.prompt for d in self.demonstrations()]
            else:
                raise DataError(
                    "task.prompts: the rl stage needs prompts (task.prompts=path, or task.demonstrations to reuse theirs)"
                )
            if self.config.eval_prompts is not None:
                held = parsed("eval_prompts", self.config.eval_prompts)
            else:
                rl, held = split_held_out(rl, self.config.eval_fraction, self.config.seed)
            held_texts = {p.text for p in held}
            rl = [p for p in rl if p.text not in held_texts]  # held-out prompts never train
            self._cache["prompts"] = (rl, held)
        return self._cache["prompts"]

    def prompts(self, split: str) -> list[Prompt]:
        rl, held = self._prompt_splits()
        return {"rl": rl, "eval": held}[split]

    def pair_kind(self, prompt: Prompt, a: Completion, b: Completion) -> str | None:
        """File-based rankings carry no pair labels."""
        return None

    def pretraining_text(self, split: str) -> list[str]:
        if "pretraining" not in self._cache:
            path = self.config.pretraining
            if path is None:
                self._cache["pretraining"] = ([], [])
            else:
                docs = parsed("pretraining", path)
                self._cache["pretraining"] = split_held_out(
                    docs, self.config.pretrain_eval_fraction, self.config.seed
                )
        train, held = self._cache["pretraining"]
        return {"train": train, "eval": held}[split]


ROW_KEYS = ("prompt", "completion", "chosen", "rejected", "responses", "ranks")


def _prompt(path: str, n: int, row: dict[str, Any], i: int) -> Prompt:
    """The row's prompt; its other fields (beyond :data:`ROW_KEYS`) reach reward functions."""
    text = text_field(path, n, row, "prompt")
    return Prompt(f"{Path(path).stem}-{i}", text, {k: v for k, v in row.items() if k not in ROW_KEYS})


def parse_demonstrations(path: str) -> list[Demonstration]:
    """prompt/completion rows."""
    rows = read_rows(path, "'prompt' and 'completion'")
    return [
        Demonstration(_prompt(path, n, row, i), text_field(path, n, row, "completion"))
        for i, (n, row) in enumerate(rows)
    ]


def parse_prompts(path: str) -> list[Prompt]:
    """prompt rows (any other fields are the reward function's)."""
    return [_prompt(path, n, row, i) for i, (n, row) in enumerate(read_rows(path, "'prompt'"))]


def _ranked(path: str, n: int, row: dict[str, Any]) -> tuple[list[str], list[int]]:
    """The texts and ranks of one comparison row (either format)."""
    if "responses" in row:
        responses = row["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise DataError(f"{path}:{n}: 'responses' must be a list of at least 2 strings, best first")
        texts = [
            text_field(path, n, {f"responses[{j}]": r}, f"responses[{j}]") for j, r in enumerate(responses)
        ]
        ranks = row.get("ranks", list(range(len(texts))))
        if (
            not isinstance(ranks, list)
            or len(ranks) != len(texts)
            or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks)
        ):
            raise DataError(
                f"{path}:{n}: 'ranks' must be a list of {len(texts)} integers (0 = best, equal = tie)"
            )
        for j, text in enumerate(texts):
            k = texts.index(text)
            if k != j and ranks[k] != ranks[j]:
                raise DataError(
                    f"{path}:{n}: responses[{k}] and responses[{j}] are the same text ranked differently"
                )
        return texts, ranks
    if "chosen" in row or "rejected" in row:
        texts = [text_field(path, n, row, "chosen"), text_field(path, n, row, "rejected")]
        if texts[0] == texts[1]:
            raise DataError(
                f"{path}:{n}: 'chosen' and 'rejected' are the same text; a comparison needs two different responses"
            )
        return texts, [0, 1]
    raise DataError(
        f"{path}:{n}: expected 'chosen' and 'rejected', or 'responses' (a ranked list, best first)"
    )


def parse_rankings(path: str) -> list[Ranking]:
    """prompt/chosen/rejected rows or ranked lists (prompt/responses [+ ranks])."""
    out = []
    for i, (n, row) in enumerate(read_rows(path, "'prompt' and 'chosen'/'rejected' or 'responses'")):
        prompt = _prompt(path, n, row, i)
        texts, ranks = _ranked(path, n, row)
        if len(set(ranks)) < 2:
            raise DataError(f"{path}:{n}: every response ties; a ranking needs at least one preference")
        out.append(Ranking(prompt, tuple(Completion(t, True) for t in texts), tuple(ranks)))
    return out


def parse_pretraining(path: str) -> list[str]:
    """Documents: ``.jsonl`` rows with ``text``, else plain text split on blank lines."""
    if path.endswith(".jsonl"):
        return [text_field(path, n, row, "text") for n, row in read_rows(path, "'text'")]
    text = read_text(path).replace("\r\n", "\n")
    docs = [d.strip() for d in re.split(r"\n[ \t]*\n", text) if d.strip()]
    if not docs:
        raise DataError(f"{path}: no text; expected documents separated by blank lines")
    return docs


PARSERS = {
    "demonstrations": parse_demonstrations,
    "comparisons": parse_rankings,
    "prompts": parse_prompts,
    "eval_prompts": parse_prompts,
    "pretraining": parse_pretraining,
}


@functools.lru_cache(maxsize=16)
def _parsed(key: str, path: str, mtime_ns: int, size: int) -> tuple[Any, ...]:
    return tuple(PARSERS[key](path))


def parsed(key: str, path: str) -> list[Any]:
    """``PARSERS[key](path)``, read once per version of the file (validation reads every file, then
    the stages read the same rows again)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return list(_parsed(key, path, st.st_mtime_ns, st.st_size))


def make_jsonl(config: JsonlConfig, ctx: BuildContext) -> JsonlTask:
    """Your data: JSONL in TRL's prompt/completion and chosen/rejected formats, ranked lists, text."""
    return JsonlTask(config)


@hookimpl
def register_tasks(register: Register) -> None:
    register("jsonl", make_jsonl, config=JsonlConfig, needs=Needs(check=JsonlConfig.check_recipe))
