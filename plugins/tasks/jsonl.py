"""Your own data through the Task seam: JSONL files in TRL's formats, ranked lists, plain text.

- ``demonstrations``: ``{"prompt": str, "completion": str}`` per line (TRL prompt/completion).
- ``comparisons``: ``{"prompt", "chosen", "rejected"}`` (TRL preference) **or** a ranked list
  ``{"prompt", "responses": [best, ..., worst]}`` with optional ``"ranks": [0, 1, 1, 2]`` (ties).
- ``prompts`` / ``eval_prompts``: ``{"prompt": str, ...}``; the other fields reach callable reward
  functions as keyword arguments.
- ``pretraining``: ``.txt`` (documents separated by blank lines) or ``.jsonl`` with ``"text"``.

A bad row is a one-line error naming the file and line and what would be valid.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructrl.core.errors import DataError
from instructrl.core.fields import param
from instructrl.core.hookspecs import Register, hookimpl
from instructrl.core.protocols import SampleFn
from instructrl.core.registry import BuildContext
from instructrl.core.types import Completion, Demonstration, Prompt, Ranking

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
            if value is not None and not Path(value).is_file():
                raise ValueError(f"{key}: file not found: {value}")
        for key in ("eval_fraction", "rank_eval_fraction", "pretrain_eval_fraction"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key} must be in [0, 1) (got {getattr(self, key)})")


def read_jsonl(path: str) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` of every non-blank line; malformed JSON names the line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{n}: malformed JSON ({exc.msg}); expected one JSON object per line"
                ) from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            rows.append((n, obj))
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

    def _prompt(self, path: str, n: int, row: dict[str, Any], i: int) -> Prompt:
        text = text_field(path, n, row, "prompt")
        fields = {
            k: v
            for k, v in row.items()
            if k not in ("prompt", "completion", "chosen", "rejected", "responses", "ranks")
        }
        return Prompt(f"{Path(path).stem}-{i}", text, fields)

    def demonstrations(self) -> list[Demonstration]:
        """prompt/completion rows."""
        if "demos" not in self._cache:
            path = self._need("demonstrations", "sft stage")
            out = []
            for i, (n, row) in enumerate(read_jsonl(path)):
                out.append(
                    Demonstration(self._prompt(path, n, row, i), text_field(path, n, row, "completion"))
                )
            self._cache["demos"] = out
        return self._cache["demos"]

    def _all_rankings(self) -> list[Ranking]:
        if "rankings" not in self._cache:
            path = self._need("comparisons", "rm stage")
            out = []
            for i, (n, row) in enumerate(read_jsonl(path)):
                prompt = self._prompt(path, n, row, i)
                if "responses" in row:
                    responses = row["responses"]
                    if not isinstance(responses, list) or len(responses) < 2:
                        raise DataError(
                            f"{path}:{n}: 'responses' must be a list of at least 2 strings, best first"
                        )
                    texts = [text_field(path, n, {"response": r}, "response") for r in responses]
                    ranks = row.get("ranks", list(range(len(texts))))
                    if (
                        not isinstance(ranks, list)
                        or len(ranks) != len(texts)
                        or not all(isinstance(r, int) for r in ranks)
                    ):
                        raise DataError(
                            f"{path}:{n}: 'ranks' must be a list of {len(texts)} integers (0 = best, equal = tie)"
                        )
                elif "chosen" in row or "rejected" in row:
                    texts = [text_field(path, n, row, "chosen"), text_field(path, n, row, "rejected")]
                    ranks = [0, 1]
                else:
                    raise DataError(
                        f"{path}:{n}: expected 'chosen' and 'rejected', or 'responses' (a ranked list, best first)"
                    )
                if len(set(ranks)) < 2:
                    raise DataError(
                        f"{path}:{n}: every response ties; a ranking needs at least one preference"
                    )
                out.append(Ranking(prompt, tuple(Completion(t, True) for t in texts), tuple(ranks)))
            self._cache["rankings"] = split_held_out(out, self.config.rank_eval_fraction, self.config.seed)
        return self._cache["rankings"]

    def rankings(self, split: str, sample: SampleFn) -> list[Ranking]:
        """Ranked responses from the file (``sample`` is not used)."""
        train, held = self._all_rankings()
        return {"train": train, "eval": held}[split]

    def _prompt_splits(self) -> tuple[list[Prompt], list[Prompt]]:
        if "prompts" not in self._cache:
            if self.config.prompts is not None:
                path = self.config.prompts
                rl = [self._prompt(path, n, row, i) for i, (n, row) in enumerate(read_jsonl(path))]
            elif self.config.demonstrations is not None:
                rl = [d.prompt for d in self.demonstrations()]
            else:
                raise DataError(
                    "task.prompts: the rl stage needs prompts (task.prompts=path, or task.demonstrations to reuse theirs)"
                )
            if self.config.eval_prompts is not None:
                path = self.config.eval_prompts
                held = [self._prompt(path, n, row, i) for i, (n, row) in enumerate(read_jsonl(path))]
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
                if path.endswith(".jsonl"):
                    docs = [text_field(path, n, row, "text") for n, row in read_jsonl(path)]
                else:
                    docs = [
                        d.strip() for d in Path(path).read_text(encoding="utf-8").split("\n\n") if d.strip()
                    ]
                self._cache["pretraining"] = split_held_out(
                    docs, self.config.pretrain_eval_fraction, self.config.seed
                )
        train, held = self._cache["pretraining"]
        return {"train": train, "eval": held}[split]


def make_jsonl(config: JsonlConfig, ctx: BuildContext) -> JsonlTask:
    """Your data: JSONL in TRL's prompt/completion and chosen/rejected formats, ranked lists, text."""
    return JsonlTask(config)


@hookimpl
def register_tasks(register: Register) -> None:
    register("jsonl", make_jsonl, config=JsonlConfig)
