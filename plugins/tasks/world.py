"""The simulated-labeler world: a Task that plays the labelers' part offline.

Instructions are small string transformations (``reverse: dbca`` → ``acbd``). A programmatic **gold
judge** knows the right answer and scores any response with partial credit; **labelers** write a
limited number of noisy demonstrations and rank K samples of the SFT policy through a
Bradley–Terry/Plackett–Luce model of the gold score; a **pretraining corpus** of general text in
the same alphabet never shows the instruction format.

Why a small reward model can learn the labeler's preferences, and why RL can then beat SFT:
labelers are scarce and sloppy. A share of the demonstrations (``demo_chatty_rate``) ends with a
chatty extra line after the answer, and some (``demo_error_rate``) carry a wrong answer. SFT
imitates both, so SFT samples often ramble, and at temperature 1 they also make content errors and
run past the token budget. The gold judge — and therefore the labeler — penalises an extra line, a
missing end token, and every character of distance from the correct answer (graded, not
all-or-nothing), so rankings of SFT samples carry a format signal that is easy to learn and a
content signal that is learnable in part. Content credit is graded so that near misses are
ranked above far misses, which gives the RM a gradient on content too.

Gold score of a response (``answer line`` = text before the first newline):

    content = 1 − Levenshtein(answer line, correct) / max(len(answer line), len(correct))
    score   = content × (1 − extra_line_penalty · [text after the answer line])
                      × (missing_eos_factor if the response was truncated else 1)
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from instructrl.core.fields import param
from instructrl.core.hookspecs import hookimpl
from instructrl.core.protocols import SampleFn
from instructrl.core.registry import BuildContext
from instructrl.core.types import Completion, Demonstration, Prompt, Ranking

LETTERS = "abcdefghijklmnopqrstuvwxyz"

KINDS: dict[str, Callable[[str], str]] = {
    "reverse": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
    "uppercase": lambda s: s.upper(),
    "repeat": lambda s: s + s,
    "count": lambda s: str(len(s)),
}
"""Instruction kind → the correct answer for an input string."""

CHATTY_LINES = (
    "hope this helps",
    "glad to help",
    "here you go",
    "have fun",
    "any time",
    "all done",
    "easy one",
)
"""What a chatty labeler appends on a new line after the answer."""


@dataclass
class WorldConfig:
    seed: int = param(
        0, "The world's seed: prompts, demonstrations, corpus and labeler noise follow from it."
    )
    kinds: list[str] = param(
        factory=lambda: list(KINDS), help="Instruction kinds: reverse, sort, uppercase, repeat, count."
    )
    min_len: int = param(3, "Shortest input string.")
    max_len: int = param(6, "Longest input string.")
    n_demos: int = param(1500, "Labeler demonstrations (SFT data; scarce, as in the paper).")
    demo_error_rate: float = param(
        0.1, "Share of demonstrations with a wrong answer (one edit away from correct)."
    )
    demo_chatty_rate: float = param(0.5, "Share of demonstrations ending with a chatty extra line.")
    n_rank_prompts: int = param(2000, "Prompts whose K SFT samples the labeler ranks (RM training).")
    n_rank_eval_prompts: int = param(300, "Held-out ranked prompts for the RM's pairwise accuracy.")
    k: int = param(4, "Responses per ranked prompt (K-way rankings).")
    labeler_temperature: float = param(
        0.1, "Bradley–Terry noise: P(labeler prefers a over b) = σ((gold_a − gold_b) / T)."
    )
    tie_margin: float = param(
        0.0, "Responses whose gold scores differ by at most this are ties (identical text always ties)."
    )
    n_rl_prompts: int = param(4000, "RL prompts (plenty).")
    n_eval_prompts: int = param(1000, "Held-out evaluation prompts, never in any training stream.")
    n_pretrain_docs: int = param(20000, "Documents of general text for the base LM and ptx.")
    n_pretrain_eval_docs: int = param(500, "Held-out documents for the pretraining-loss measurement.")
    corpus_skill_rate: float = param(
        0.3,
        "Share of corpus sentences stating a string fact in prose ('dbca backwards is acbd'): skills without the instruction format.",
    )
    extra_line_penalty: float = param(
        0.7, "Gold penalty (fraction of the score) for text after the answer line."
    )
    missing_eos_factor: float = param(0.5, "Gold multiplier for a response truncated without the end token.")

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be a non-empty list of {', '.join(KINDS)} (got {list(self.kinds)})")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(
                f"min_len must be >= 1 and <= max_len (got min_len={self.min_len}, max_len={self.max_len})"
            )
        if self.k < 2:
            raise ValueError(f"k must be >= 2 (got {self.k})")
        for name in (
            "demo_error_rate",
            "demo_chatty_rate",
            "extra_line_penalty",
            "missing_eos_factor",
            "corpus_skill_rate",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] (got {getattr(self, name)})")
        if self.labeler_temperature <= 0:
            raise ValueError(f"labeler_temperature must be > 0 (got {self.labeler_temperature})")
        if self.tie_margin < 0:
            raise ValueError(f"tie_margin must be >= 0 (got {self.tie_margin})")
        for name in (
            "n_demos",
            "n_rank_prompts",
            "n_rank_eval_prompts",
            "n_rl_prompts",
            "n_eval_prompts",
            "n_pretrain_docs",
            "n_pretrain_eval_docs",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (got {getattr(self, name)})")
        capacity = len(self.kinds) * sum(26**n for n in range(self.min_len, self.max_len + 1))
        needed = (
            self.n_demos
            + self.n_rank_prompts
            + self.n_rank_eval_prompts
            + self.n_rl_prompts
            + self.n_eval_prompts
        )
        if needed > capacity // 2:
            raise ValueError(
                f"n_demos + n_rank_prompts + ... = {needed} distinct prompts do not fit inputs of length {self.min_len}..{self.max_len} (max {capacity // 2})"
            )


# --------------------------------------------------------------------------------------------
# Gold judge
# --------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def similarity(a: str, b: str) -> float:
    """``1 − Levenshtein(a, b) / max(len a, len b)``; 1 for two empty strings."""
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else 1.0 - levenshtein(a, b) / longest


def response_format(text: str, ended: bool) -> str:
    """``clean`` | ``extra_line`` | ``truncated`` (truncation wins): the kind of a response."""
    if not ended:
        return "truncated"
    return "extra_line" if "\n" in text and text.split("\n", 1)[1].strip() else "clean"


class GoldJudge:
    """Partial credit for content, penalties for an extra line and for a missing end token."""

    def __init__(self, extra_line_penalty: float, missing_eos_factor: float) -> None:
        self.extra_line_penalty = extra_line_penalty
        self.missing_eos_factor = missing_eos_factor

    def score_one(self, answer: str, completion: Completion) -> float:
        line, _, rest = completion.text.partition("\n")
        score = similarity(line.strip(), answer)
        if rest.strip():
            score *= 1.0 - self.extra_line_penalty
        if not completion.ended:
            score *= self.missing_eos_factor
        return score

    def score(self, prompts: Sequence[Prompt], completions: Sequence[Completion]) -> list[float]:
        """One gold score in [0, 1] per response."""
        return [self.score_one(str(p.fields["answer"]), c) for p, c in zip(prompts, completions)]


# --------------------------------------------------------------------------------------------
# The labeler
# --------------------------------------------------------------------------------------------


def labeler_ranks(
    gold: Sequence[float], texts: Sequence[str], rng: random.Random, temperature: float, tie_margin: float
) -> list[int]:
    """Plackett–Luce ranking by noisy gold utility (Gumbel-max trick), ties merged.

    Responses with identical text, or gold scores within ``tie_margin``, form a tie group (the
    transitive closure of that relation); groups are ordered by their best member's noisy utility
    ``gold/T + Gumbel``. Pairwise, two singletons are ordered as Bradley–Terry with
    ``P(a ≻ b) = σ((gold_a − gold_b)/T)``. Returns ranks, 0 = best, equal = tie.
    """
    k = len(gold)
    parent = list(range(k))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(k):
        for j in range(i + 1, k):
            if texts[i] == texts[j] or abs(gold[i] - gold[j]) <= tie_margin:
                parent[find(i)] = find(j)
    utility = [g / temperature - math.log(-math.log(max(rng.random(), 1e-12))) for g in gold]
    best: dict[int, float] = {}
    for i in range(k):
        root = find(i)
        best[root] = max(best.get(root, -math.inf), utility[i])
    order = sorted(best, key=lambda r: -best[r])
    rank_of = {root: rank for rank, root in enumerate(order)}
    return [rank_of[find(i)] for i in range(k)]


def labeler_agreement(rankings: Sequence[Ranking], gold_scores: Sequence[Sequence[float]]) -> float:
    """The labeler's agreement with the gold ordering on pairs whose gold scores differ (a labeler
    tie counts ½): the ceiling on a reward model's accuracy against gold."""
    agree, total = 0.0, 0
    for r, g in zip(rankings, gold_scores):
        for i in range(len(g)):
            for j in range(i + 1, len(g)):
                if g[i] == g[j]:
                    continue
                total += 1
                if r.ranks[i] == r.ranks[j]:
                    agree += 0.5
                else:
                    agree += float((r.ranks[i] < r.ranks[j]) == (g[i] > g[j]))
    return agree / total if total else float("nan")


# --------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------


def corrupt(answer: str, rng: random.Random) -> str:
    """A wrong answer one edit away from ``answer`` (substitute, drop or insert a character)."""
    pool = LETTERS.upper() if answer.isupper() else ("0123456789" if answer.isdigit() else LETTERS)
    i = rng.randrange(len(answer))
    op = rng.choice(("substitute", "drop", "insert") if len(answer) > 1 else ("substitute", "insert"))
    if op == "substitute":
        choices = [c for c in pool if c != answer[i]]
        return answer[:i] + rng.choice(choices) + answer[i + 1 :]
    if op == "drop":
        return answer[:i] + answer[i + 1 :]
    return answer[:i] + rng.choice(pool) + answer[i:]


class World:
    """The simulated-labeler Task."""

    def __init__(self, config: WorldConfig) -> None:
        self.config = config
        self.gold = GoldJudge(config.extra_line_penalty, config.missing_eos_factor)
        self._splits = self._make_prompts()
        self._demos: list[Demonstration] | None = None

    # -- prompts -------------------------------------------------------------------------------
    def _make_prompts(self) -> dict[str, list[Prompt]]:
        c = self.config
        rng = random.Random(f"world-prompts-{c.seed}")
        sizes = {
            "demo": c.n_demos,
            "rank": c.n_rank_prompts,
            "rank_eval": c.n_rank_eval_prompts,
            "rl": c.n_rl_prompts,
            "eval": c.n_eval_prompts,
        }
        seen: set[str] = set()
        out: dict[str, list[Prompt]] = {}
        # eval first, so the held-out set does not depend on the training sizes
        for split in ("eval", "rank_eval", "demo", "rank", "rl"):
            prompts = []
            while len(prompts) < sizes[split]:
                kind = rng.choice(c.kinds)
                text = "".join(rng.choice(LETTERS) for _ in range(rng.randint(c.min_len, c.max_len)))
                prompt_text = f"{kind}: {text}\n"
                if prompt_text in seen:
                    continue
                seen.add(prompt_text)
                pid = f"{split}-{len(prompts)}"
                prompts.append(
                    Prompt(pid, prompt_text, {"kind": kind, "input": text, "answer": KINDS[kind](text)})
                )
            out[split] = prompts
        return out

    def prompts(self, split: str) -> list[Prompt]:
        """``"rl"`` or ``"eval"`` prompts."""
        if split not in ("rl", "eval"):
            raise ValueError(f"world: prompt split must be 'rl' or 'eval' (got {split!r})")
        return self._splits[split]

    # -- demonstrations ------------------------------------------------------------------------
    def demonstrations(self) -> list[Demonstration]:
        """Labeler-written responses: some wrong, some with a chatty extra line."""
        if self._demos is None:
            c = self.config
            rng = random.Random(f"world-demos-{c.seed}")
            demos = []
            for p in self._splits["demo"]:
                answer = str(p.fields["answer"])
                if rng.random() < c.demo_error_rate:
                    answer = corrupt(answer, rng)
                if rng.random() < c.demo_chatty_rate:
                    answer = f"{answer}\n{rng.choice(CHATTY_LINES)}"
                demos.append(Demonstration(p, answer))
            self._demos = demos
        return self._demos

    # -- rankings ------------------------------------------------------------------------------
    def rankings(self, split: str, sample: SampleFn) -> list[Ranking]:
        """The labeler ranks ``k`` SFT samples per prompt (``"train"`` or held-out ``"eval"``)."""
        key = {"train": "rank", "eval": "rank_eval"}.get(split)
        if key is None:
            raise ValueError(f"world: ranking split must be 'train' or 'eval' (got {split!r})")
        prompts = self._splits[key]
        if not prompts:
            return []
        c = self.config
        samples = sample(prompts, c.k)
        rng = random.Random(f"world-labeler-{c.seed}-{split}")
        out = []
        for p, completions in zip(prompts, samples):
            gold = self.gold.score([p] * len(completions), completions)
            ranks = labeler_ranks(
                gold,
                [x.text + ("" if x.ended else "…") for x in completions],
                rng,
                c.labeler_temperature,
                c.tie_margin,
            )
            if len(set(ranks)) > 1:  # a prompt whose responses all tie carries no pair
                out.append(Ranking(p, tuple(completions), tuple(ranks)))
        return out

    def pair_kind(self, prompt: Prompt, a: Completion, b: Completion) -> str:
        """The kind of a compared pair, for the RM's accuracy split: ``clean_vs_extra_line`` …"""
        fa, fb = sorted((response_format(a.text, a.ended), response_format(b.text, b.ended)))
        return "same_format" if fa == fb else f"{fa}_vs_{fb}"

    # -- pretraining text ----------------------------------------------------------------------
    def pretraining_text(self, split: str) -> list[str]:
        """General text in the world's alphabet; never the instruction format."""
        n = {"train": self.config.n_pretrain_docs, "eval": self.config.n_pretrain_eval_docs}.get(split)
        if n is None:
            raise ValueError(f"world: pretraining split must be 'train' or 'eval' (got {split!r})")
        rng = random.Random(f"world-corpus-{self.config.seed}-{split}")
        held_out = {str(p.fields["input"]) for p in self._splits["eval"]}
        return [corpus_document(rng, self.config, held_out) for _ in range(n)]


WORDS = (
    "the a of and to in is was it for on with as at by from this that we you they he she one two three "
    "day night sun moon sea tree house road river stone bird fish cat dog king queen song story letter word line "
    "red blue green small big old new long short quick slow warm cold bright dark happy quiet "
    "walks runs sings reads writes finds keeps takes gives sees hears knows makes holds opens"
).split()


SKILL_SENTENCES: dict[str, tuple[str, ...]] = {
    "reverse": ("{s} backwards is {a}", "read backwards, {s} becomes {a}", "the mirror of {s} is {a}"),
    "sort": (
        "{s} in alphabetical order is {a}",
        "sorting {s} gives {a}",
        "the letters of {s} in order make {a}",
    ),
    "uppercase": ("{s} in capitals is {a}", "shouted, {s} becomes {a}", "written large, {s} is {a}"),
    "repeat": ("{s} twice is {a}", "say {s} two times and you get {a}", "{s} and {s} again make {a}"),
    "count": ("{s} has {a} letters", "there are {a} letters in {s}", "the word {s} is {a} letters long"),
}
"""Prose statements of each kind's skill: the corpus teaches the skills, never the instruction format."""


def corpus_document(rng: random.Random, config: WorldConfig, held_out: set[str]) -> str:
    """A few sentences of plain text: words from a small lexicon with a sprinkling of capitals,
    numbers and letter strings, and (with ``corpus_skill_rate``) prose facts about letter strings.
    No ``kind: input`` instruction line ever appears, and no held-out evaluation input."""
    sentences = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < config.corpus_skill_rate:
            kind = rng.choice(config.kinds)
            text = "".join(rng.choice(LETTERS) for _ in range(rng.randint(config.min_len, config.max_len)))
            if text in held_out:
                continue
            sentences.append(rng.choice(SKILL_SENTENCES[kind]).format(s=text, a=KINDS[kind](text)) + ".")
            continue
        else:
            words = []
            for _ in range(rng.randint(4, 10)):
                r = rng.random()
                if r < 0.12:
                    words.append("".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 7))))
                elif r < 0.17:
                    words.append(str(rng.randint(0, 99)))
                elif r < 0.22:
                    words.append(rng.choice(WORDS).upper())
                else:
                    words.append(rng.choice(WORDS))
            sentence = " ".join(words)
            sentences.append(sentence[0].upper() + sentence[1:] + rng.choice(".!?"))
    return (" " if rng.random() < 0.7 else "\n").join(sentences) or "The end."


def make_world(config: WorldConfig, ctx: BuildContext) -> World:
    """Simulated labelers: string instructions, a gold judge, noisy demos and K-way rankings."""
    return World(config)


@hookimpl
def register_tasks(register: Any) -> None:
    register("world", make_world, config=WorldConfig)
