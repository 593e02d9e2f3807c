"""The simulated-labeler world: a Task that plays the labelers' part offline.

Instructions are small string tasks (``reverse: dbca`` → ``acbd``, ``largest: dbca`` → ``d``). A
programmatic **gold judge** grades any response: a per-kind **verifier** gives graded content
credit in [0, 1] by checking the properties a correct answer must have (sorted and made of the
input's letters; every letter a capital and the same letters; the count matches), and each format
flaw costs a fixed penalty. **Labelers** write a limited number of demonstrations with content
flaws (typos, partial answers, wrong items) and a format flaw (a chatty extra line), and rank K
samples of the SFT policy through a Bradley–Terry/Plackett–Luce model of the gold score. A
**pretraining corpus** in the same alphabet never shows the instruction format, and (in the
default ``domain`` style) never an input of any prompt, so never an input next to its answer.

Gold score of a response (``answer line`` = the text before the first newline, stripped)::

    content = verify_<kind>(input, answer line)                          in [0, 1]
    format  = extra_line_penalty  · [any text after the answer line]
            + missing_eos_penalty · [truncated without the end token]      >= 0
    gold    = content − format

Why a small reward model can learn the labeler, and RL can then beat SFT: labelers are scarce and
sloppy, SFT imitates their flaws, and the labeler ranks SFT samples by a score in which content and
format both matter and trade off additively (a near miss can beat a chatty correct answer).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from instructrl.core.fields import param
from instructrl.core.hookspecs import hookimpl
from instructrl.core.protocols import SampleFn
from instructrl.core.registry import BuildContext
from instructrl.core.types import Completion, Demonstration, Prompt, Ranking

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"

# --------------------------------------------------------------------------------------------
# Graded-credit helpers (pure)
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


def letter_overlap(response: str, letters: str) -> float:
    """Shared letters as multisets over the longer string: ``|R ∩ L| / max(|R|, |L|)``.

    1 exactly when ``response`` is a permutation of ``letters``; a missing, extra or wrong letter
    each costs ``1/max``. 1 for two empty strings.
    """
    longest = max(len(response), len(letters))
    if longest == 0:
        return 1.0
    return sum((Counter(response) & Counter(letters)).values()) / longest


def order_share(text: str, descending: bool = False) -> float:
    """Share of adjacent character pairs in order (``a <= b``, or ``a >= b`` if ``descending``);
    1 for strings shorter than two characters."""
    pairs = list(zip(text, text[1:]))
    if not pairs:
        return 1.0
    return sum((a >= b) if descending else (a <= b) for a, b in pairs) / len(pairs)


def case_share(text: str, upper_at: Callable[[int], bool]) -> float:
    """Share of characters whose case is right: position ``i`` must be a capital if
    ``upper_at(i)``, else a small letter (anything else is wrong). 0 for an empty string."""
    if not text:
        return 0.0
    return sum(c.isupper() if upper_at(i) else c.islower() for i, c in enumerate(text)) / len(text)


def extreme_credit(text: str, response: str, largest: bool) -> float:
    """Credit for naming the largest (or smallest) letter of ``text``.

    The response's first character must be a letter of the input; it earns
    ``1 − (distinct input letters beyond it) / (distinct input letters − 1)`` (1 when the input has
    one distinct letter), divided by the response's length (extra characters dilute it).
    """
    if not response or response[0] not in text:
        return 0.0
    letters = set(text)
    if len(letters) == 1:
        rank = 1.0
    else:
        beyond = sum((c > response[0]) if largest else (c < response[0]) for c in letters)
        rank = 1.0 - beyond / (len(letters) - 1)
    return rank / len(response)


# --------------------------------------------------------------------------------------------
# Verifiers: graded content credit in [0, 1], 1 exactly for the correct answer
# --------------------------------------------------------------------------------------------


def verify_reverse(text: str, response: str) -> float:
    """Read backwards, the response should be the input: ``similarity(response[::-1], input)``."""
    return similarity(response[::-1], text)


def verify_sort(text: str, response: str) -> float:
    """Sorted and made of the input's letters: ``letter_overlap × order_share``."""
    return letter_overlap(response, text) * order_share(response)


def verify_sort_desc(text: str, response: str) -> float:
    """Sorted from z down to a and made of the input's letters: ``letter_overlap × order_share(desc)``."""
    return letter_overlap(response, text) * order_share(response, descending=True)


def verify_uppercase(text: str, response: str) -> float:
    """Every character a capital, and the same letters: ``similarity(lower(response), input) ×
    share of capitals``."""
    return similarity(response.lower(), text) * case_share(response, lambda i: True)


def verify_capitalize(text: str, response: str) -> float:
    """Only the first letter a capital, and the same letters: ``similarity(lower(response), input)
    × share of characters with the right case``."""
    return similarity(response.lower(), text) * case_share(response, lambda i: i == 0)


def verify_repeat(text: str, response: str) -> float:
    """The input twice: ``similarity(response, input + input)``."""
    return similarity(response, text + text)


def verify_count(text: str, response: str) -> float:
    """The number of letters, as a plain decimal numeral: ``max(0, 1 − |n − len(input)| / len(input))``;
    0 for anything that is not a numeral without leading zeros."""
    if not (response.isascii() and response.isdigit()) or response != str(int(response)):
        return 0.0
    if not text:
        return float(response == "0")
    return max(0.0, 1.0 - abs(int(response) - len(text)) / len(text))


def verify_largest(text: str, response: str) -> float:
    """A letter of the input with none later in the alphabet: :func:`extreme_credit`."""
    return extreme_credit(text, response, largest=True)


def verify_smallest(text: str, response: str) -> float:
    """A letter of the input with none earlier in the alphabet: :func:`extreme_credit`."""
    return extreme_credit(text, response, largest=False)


def verify_first_last(text: str, response: str) -> float:
    """Two letters, the input's first then its last: ½ per matching position, times
    ``2 / max(2, len(response))`` (extra characters dilute the credit)."""
    hits = (response[:1] == text[:1]) + (response[1:2] == text[-1:])
    return hits / 2 * 2 / max(2, len(response))


def verify_every_other(text: str, response: str) -> float:
    """The 1st, 3rd, 5th, … letters: ``similarity(response, input[::2])`` (a wrong or missing item
    costs one edit)."""
    return similarity(response, text[::2])


@dataclass(frozen=True)
class Kind:
    """An instruction kind: its correct answer and its verifier. Calling it gives the answer."""

    name: str
    answer: Callable[[str], str]
    """The correct response for an input string."""
    verify: Callable[[str, str], float]
    """``verify(input, answer line)`` → graded content credit in [0, 1]."""
    description: str

    def __call__(self, text: str) -> str:
        """The correct answer for ``text``."""
        return self.answer(text)


def _kinds(*kinds: Kind) -> dict[str, Kind]:
    return {k.name: k for k in kinds}


KINDS: dict[str, Kind] = _kinds(
    Kind("reverse", lambda s: s[::-1], verify_reverse, "the letters in reverse order"),
    Kind("sort", lambda s: "".join(sorted(s)), verify_sort, "the letters in alphabetical order"),
    Kind("uppercase", lambda s: s.upper(), verify_uppercase, "every letter a capital"),
    Kind("repeat", lambda s: s + s, verify_repeat, "the input twice"),
    Kind("count", lambda s: str(len(s)), verify_count, "the number of letters"),
    Kind(
        "sort_desc",
        lambda s: "".join(sorted(s, reverse=True)),
        verify_sort_desc,
        "the letters from z down to a",
    ),
    Kind("largest", lambda s: max(s), verify_largest, "the letter latest in the alphabet"),
    Kind("smallest", lambda s: min(s), verify_smallest, "the letter earliest in the alphabet"),
    Kind("first_last", lambda s: s[0] + s[-1], verify_first_last, "the first letter, then the last"),
    Kind("every_other", lambda s: s[::2], verify_every_other, "the 1st, 3rd, 5th, … letters"),
    Kind("capitalize", lambda s: s[:1].upper() + s[1:], verify_capitalize, "only the first letter a capital"),
)
"""Instruction kind → :class:`Kind` (``KINDS[kind](input)`` is the correct answer;
``KINDS[kind].verify(input, response)`` the graded content credit)."""

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
    kinds: list[str] = param(factory=lambda: list(KINDS), help=f"Instruction kinds: {', '.join(KINDS)}.")
    min_len: int = param(3, "Shortest input string.")
    max_len: int = param(6, "Longest input string.")
    n_demos: int = param(1500, "Labeler demonstrations (SFT data; scarce, as in the paper).")
    demo_error_rate: float = param(
        0.1, "Share of demonstrations with a typo: one random edit away from the correct answer."
    )
    demo_partial_rate: float = param(
        0.15, "Share of demonstrations whose answer stops early (a proper prefix; answers of 2+ characters)."
    )
    demo_wrong_item_rate: float = param(
        0.15,
        "Share of demonstrations with a wrong item: a letter swapped for another input letter, an item dropped, or a count off by one.",
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
    n_pretrain_docs: int = param(20000, "Documents of plain text for the base LM and ptx.")
    n_pretrain_eval_docs: int = param(500, "Held-out documents for the pretraining-loss measurement.")
    corpus_style: Literal["general", "domain"] = param(
        "domain",
        "Pretraining text: 'domain' (prose about letters, words, order and counting; no prompt input ever) or 'general' (the lexicon corpus with prose string facts).",
    )
    corpus_domain_rate: float = param(
        0.5, "corpus_style=domain: share of sentences about letters, words, order and counting."
    )
    corpus_skill_rate: float = param(
        0.3,
        "corpus_style=general: share of sentences stating a string fact in prose ('dbca backwards is acbd').",
    )
    extra_line_penalty: float = param(0.3, "Gold penalty subtracted for text after the answer line.")
    missing_eos_penalty: float = param(
        0.5, "Gold penalty subtracted for a response truncated without the end token."
    )

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
            "demo_partial_rate",
            "demo_wrong_item_rate",
            "demo_chatty_rate",
            "corpus_domain_rate",
            "corpus_skill_rate",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1] (got {getattr(self, name)})")
        flawed = self.demo_error_rate + self.demo_partial_rate + self.demo_wrong_item_rate
        if flawed > 1.0:
            raise ValueError(
                f"demo_error_rate + demo_partial_rate + demo_wrong_item_rate must be <= 1 (got {flawed:g})"
            )
        for name in ("extra_line_penalty", "missing_eos_penalty"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.corpus_style not in ("general", "domain"):
            raise ValueError(f"corpus_style must be 'general' or 'domain' (got {self.corpus_style!r})")
        if self.labeler_temperature <= 0:
            raise ValueError(f"labeler_temperature must be > 0 (got {self.labeler_temperature})")
        if self.tie_margin < 0:
            raise ValueError(f"tie_margin must be >= 0 (got {self.tie_margin})")
        # the smallest size each stream can have and still feed its stage (held-out ones may be empty)
        least = {"n_demos": 2, "n_rank_prompts": 1, "n_rank_eval_prompts": 0, "n_rl_prompts": 1,
                 "n_eval_prompts": 1, "n_pretrain_docs": 1, "n_pretrain_eval_docs": 0}  # fmt: skip
        for name, low in least.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low} (got {getattr(self, name)})")
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


def prompt_kind_input(prompt: Prompt) -> tuple[str, str]:
    """The instruction kind and input of a world prompt: its ``kind``/``input`` fields, else parsed
    from its text ``<kind>: <input>\\n``."""
    kind, text = prompt.fields.get("kind"), prompt.fields.get("input")
    if kind is None or text is None:
        kind, sep, text = prompt.text.rstrip("\n").partition(": ")
        if not sep:
            kind = ""
    if kind not in KINDS:
        raise ValueError(
            f"world: prompt {prompt.id!r} is not a '<kind>: <input>' instruction of {', '.join(KINDS)}"
        )
    return str(kind), str(text)


def response_format(text: str, ended: bool) -> str:
    """``clean`` | ``extra_line`` | ``truncated`` (truncation wins): the kind of a response."""
    if not ended:
        return "truncated"
    return "extra_line" if "\n" in text and text.split("\n", 1)[1].strip() else "clean"


class GoldJudge:
    """``gold = content − format``: a verifier's graded content credit minus format penalties."""

    def __init__(self, extra_line_penalty: float, missing_eos_penalty: float) -> None:
        self.extra_line_penalty = extra_line_penalty
        self.missing_eos_penalty = missing_eos_penalty

    def parts_one(self, prompt: Prompt, completion: Completion) -> tuple[float, float]:
        """``(content, format)`` of one response."""
        kind, text = prompt_kind_input(prompt)
        line, _, rest = completion.text.partition("\n")
        content = KINDS[kind].verify(text, line.strip())
        penalty = 0.0
        if rest.strip():
            penalty += self.extra_line_penalty
        if not completion.ended:
            penalty += self.missing_eos_penalty
        return content, penalty

    def parts(self, prompts: Sequence[Prompt], completions: Sequence[Completion]) -> dict[str, list[float]]:
        """``{"content": [...], "format": [...]}`` per response; ``score == content − format``."""
        pairs = [self.parts_one(p, c) for p, c in zip(prompts, completions)]
        return {"content": [c for c, _ in pairs], "format": [f for _, f in pairs]}

    def score(self, prompts: Sequence[Prompt], completions: Sequence[Completion]) -> list[float]:
        """One gold score per response, ``content − format`` in
        ``[−(extra_line_penalty + missing_eos_penalty), 1]``."""
        parts = self.parts(prompts, completions)
        return [c - f for c, f in zip(parts["content"], parts["format"])]


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
# Demonstration flaws (pure, given the rng)
# --------------------------------------------------------------------------------------------


def corrupt(answer: str, rng: random.Random) -> str:
    """A typo: ``answer`` one random edit away (substitute, drop or insert a character)."""
    pool = LETTERS.upper() if answer.isupper() else (DIGITS if answer.isdigit() else LETTERS)
    i = rng.randrange(len(answer))
    op = rng.choice(("substitute", "drop", "insert") if len(answer) > 1 else ("substitute", "insert"))
    if op == "substitute":
        choices = [c for c in pool if c != answer[i]]
        return answer[:i] + rng.choice(choices) + answer[i + 1 :]
    if op == "drop":
        return answer[:i] + answer[i + 1 :]
    return answer[:i] + rng.choice(pool) + answer[i:]


def partial(answer: str, rng: random.Random) -> str:
    """A partial answer: the first ``k`` characters, ``1 <= k < len(answer)``. An answer of one
    character cannot be cut and is returned unchanged."""
    if len(answer) < 2:
        return answer
    return answer[: rng.randint(1, len(answer) - 1)]


def wrong_item(answer: str, text: str, rng: random.Random) -> str:
    """A plausible content mistake in ``answer`` (the answer for input ``text``).

    A count is off by one (up or down, never below 0). Otherwise, with probability ½ (answers of
    two or more characters) one item other than the last is dropped, else one item is swapped for
    a different letter of the input (in the replaced item's case; any other letter when the input
    has no other).
    """
    if answer.isdigit():
        n = int(answer)
        return str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)
    if len(answer) >= 2 and rng.random() < 0.5:
        i = rng.randrange(len(answer) - 1)
        return answer[:i] + answer[i + 1 :]
    i = rng.randrange(len(answer))
    old = answer[i].lower()
    pool = sorted({c for c in text if c != old}) or [c for c in LETTERS if c != old]
    new = rng.choice(pool)
    return answer[:i] + (new.upper() if answer[i].isupper() else new) + answer[i + 1 :]


DEMO_FLAWS = ("none", "error", "partial", "wrong_item")
"""Content flaws of a demonstration (:meth:`World.demo_flaws`); at most one per demonstration."""


# --------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------


class World:
    """The simulated-labeler Task."""

    def __init__(self, config: WorldConfig) -> None:
        self.config = config
        self.gold = GoldJudge(config.extra_line_penalty, config.missing_eos_penalty)
        self._splits = self._make_prompts()
        self._demos: list[Demonstration] | None = None
        self._demo_flaws: list[str] = []

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

    def prompt_group(self, prompt: Prompt) -> str:
        """The instruction kind of a prompt (``reverse``, ``largest``, …), for per-task figures."""
        return prompt_kind_input(prompt)[0]

    # -- demonstrations ------------------------------------------------------------------------
    def demonstrations(self) -> list[Demonstration]:
        """Labeler-written responses: some with a content flaw, some with a chatty extra line."""
        if self._demos is None:
            c = self.config
            rng = random.Random(f"world-demos-{c.seed}")
            demos, flaws = [], []
            for p in self._splits["demo"]:
                answer, text = str(p.fields["answer"]), str(p.fields["input"])
                u = rng.random()
                flaw = "none"
                if u < c.demo_error_rate:
                    flaw, answer = "error", corrupt(answer, rng)
                elif u < c.demo_error_rate + c.demo_partial_rate:
                    if len(answer) >= 2:
                        flaw, answer = "partial", partial(answer, rng)
                elif u < c.demo_error_rate + c.demo_partial_rate + c.demo_wrong_item_rate:
                    flaw, answer = "wrong_item", wrong_item(answer, text, rng)
                if rng.random() < c.demo_chatty_rate:
                    answer = f"{answer}\n{rng.choice(CHATTY_LINES)}"
                demos.append(Demonstration(p, answer))
                flaws.append(flaw)
            self._demos, self._demo_flaws = demos, flaws
        return self._demos

    def demo_flaws(self) -> list[str]:
        """The content flaw of each demonstration, in order: one of :data:`DEMO_FLAWS`."""
        self.demonstrations()
        return list(self._demo_flaws)

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
        """The kind of a compared pair by the two formats, for the RM's accuracy split:
        ``clean_vs_extra_line``, ``clean_vs_truncated``, ``extra_line_vs_truncated`` or
        ``same_format`` (then only content can separate them)."""
        fa, fb = sorted((response_format(a.text, a.ended), response_format(b.text, b.ended)))
        return "same_format" if fa == fb else f"{fa}_vs_{fb}"

    # -- pretraining text ----------------------------------------------------------------------
    def pretraining_text(self, split: str) -> list[str]:
        """Plain text in the world's alphabet; never the instruction format (see ``corpus_style``)."""
        n = {"train": self.config.n_pretrain_docs, "eval": self.config.n_pretrain_eval_docs}.get(split)
        if n is None:
            raise ValueError(f"world: pretraining split must be 'train' or 'eval' (got {split!r})")
        rng = random.Random(f"world-corpus-{self.config.seed}-{split}")
        if self.config.corpus_style == "general":
            held_out = {str(p.fields["input"]) for p in self._splits["eval"]}
            return [corpus_document(rng, self.config, held_out) for _ in range(n)]
        banned = {str(p.fields["input"]) for prompts in self._splits.values() for p in prompts}
        return [domain_document(rng, self.config, banned) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# Pretraining corpus
# --------------------------------------------------------------------------------------------

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
"""``corpus_style=general`` only: prose statements of a kind's skill on a random string (these
*are* input/answer facts, in prose; held-out evaluation inputs are excluded)."""


def random_string(rng: random.Random, lo: int = 2, hi: int = 7) -> str:
    """A random lowercase letter string of ``lo``–``hi`` letters."""
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def lexicon_sentence(rng: random.Random) -> str:
    """4–10 words from the lexicon with a sprinkling of letter strings, numbers and capitals."""
    words = []
    for _ in range(rng.randint(4, 10)):
        r = rng.random()
        if r < 0.12:
            words.append(random_string(rng))
        elif r < 0.17:
            words.append(str(rng.randint(0, 99)))
        elif r < 0.22:
            words.append(rng.choice(WORDS).upper())
        else:
            words.append(rng.choice(WORDS))
    sentence = " ".join(words)
    return sentence[0].upper() + sentence[1:] + rng.choice(".!?")


def corpus_document(rng: random.Random, config: WorldConfig, held_out: set[str]) -> str:
    """``corpus_style=general``: a few sentences of lexicon text and (with ``corpus_skill_rate``)
    prose facts about letter strings for the kinds that have them (:data:`SKILL_SENTENCES`).
    No ``kind: input`` instruction line ever appears, and no held-out evaluation input."""
    skill_kinds = [k for k in config.kinds if k in SKILL_SENTENCES]
    sentences = []
    for _ in range(rng.randint(1, 3)):
        if skill_kinds and rng.random() < config.corpus_skill_rate:
            kind = rng.choice(skill_kinds)
            text = random_string(rng, config.min_len, config.max_len)
            if text in held_out:
                continue
            sentences.append(rng.choice(SKILL_SENTENCES[kind]).format(s=text, a=KINDS[kind](text)) + ".")
        else:
            sentences.append(lexicon_sentence(rng))
    return (" " if rng.random() < 0.7 else "\n").join(sentences) or "The end."


KIND_PROSE: dict[str, tuple[str, ...]] = {
    "reverse": (
        "to reverse a word, read its letters from the last one to the first one",
        "a word in reverse starts with the letter it used to end with",
    ),
    "sort": (
        "to sort the letters of a word, put them in alphabetical order",
        "in a sorted word no letter comes before a letter that is earlier in the alphabet",
    ),
    "uppercase": (
        "to write a word in uppercase, make every letter a capital",
        "uppercase letters are the big capitals, the others are small letters",
    ),
    "repeat": (
        "to repeat a word, write it twice with nothing in between",
        "a repeated word is twice as long as the word itself",
    ),
    "count": (
        "to count the letters of a word, say one number for each letter",
        "a count is a number, and a longer word has a larger count",
    ),
    "sort_desc": (
        "sorting letters from z down to a gives the opposite of alphabetical order",
        "in the opposite order the latest letter of the alphabet comes first",
    ),
    "largest": (
        "the largest letter of a word is the one that comes latest in the alphabet",
        "z is the largest of all letters",
    ),
    "smallest": (
        "the smallest letter of a word is the one that comes earliest in the alphabet",
        "a is the smallest of all letters",
    ),
    "first_last": (
        "every word has a first letter and a last letter",
        "the first and the last letter of a long word are far apart",
    ),
    "every_other": (
        "every other letter means the first, the third, the fifth and so on",
        "taking every other letter of a word makes it about half as long",
    ),
    "capitalize": (
        "to capitalize a word, make its first letter a capital and keep the rest small",
        "names and the first word of a sentence are capitalized",
    ),
}
"""``corpus_style=domain``: how each skill works, in prose, never applied to a particular string."""

NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def alphabet_sentence(rng: random.Random) -> str:
    """A true fact about the alphabet (order, neighbours, capitals), never about a word."""
    i, j = sorted(rng.sample(range(26), 2))
    a, b = LETTERS[i], LETTERS[j]
    start = rng.randrange(0, 22)
    run = " ".join(LETTERS[start : start + rng.randint(3, min(8, 26 - start))])
    c = rng.choice(LETTERS[:-1])
    templates = (
        f"{a} comes before {b} in the alphabet",
        f"{b} comes after {a} in the alphabet",
        f"the letter after {c} is {LETTERS[LETTERS.index(c) + 1]}",
        f"the capital of {a} is {a.upper()}",
        f"{b.upper()} is the big letter and {b} is the small one",
        f"in the alphabet the letters {run} come in this order",
        "the alphabet has 26 letters, from a to z",
        "a e i o u are the vowels",
    )
    return rng.choice(templates)


def number_sentence(rng: random.Random) -> str:
    """A fact about numbers and counting, with no letter string in it."""
    n = rng.randint(1, 12)
    start = rng.randint(0, 90)
    templates = (
        f"{NUMBER_WORDS[n]} is written {n}",
        f"{n} comes after {n - 1}",
        f"count {' '.join(str(x) for x in range(start, start + rng.randint(3, 6)))} and so on",
        f"{n} and {n} make {2 * n}",
    )
    return rng.choice(templates)


def mention_sentence(rng: random.Random) -> str:
    """A sentence that mentions letter strings and states nothing about them."""
    w, v = random_string(rng), random_string(rng)
    templates = (
        f"she wrote {w} on the board",
        f"the word {w} is not in any book",
        f"{w.upper()} was painted in big letters on the wall",
        f"he said {w} and then {v}",
        f"nobody knows what {w} means",
        f"the sign read {w.upper()} {v}",
    )
    return rng.choice(templates)


def domain_sentence(rng: random.Random, config: WorldConfig) -> str:
    """One sentence of the ``domain`` corpus, before the leak check."""
    if rng.random() >= config.corpus_domain_rate:
        return lexicon_sentence(rng)
    topic = rng.randrange(4)
    if topic == 0:
        sentence = rng.choice(KIND_PROSE[rng.choice(config.kinds)])
    elif topic == 1:
        sentence = alphabet_sentence(rng)
    elif topic == 2:
        sentence = number_sentence(rng)
    else:
        sentence = mention_sentence(rng)
    return sentence[0].upper() + sentence[1:] + "."


def words_of(text: str) -> list[str]:
    """The whitespace-separated words of ``text``, punctuation ``.,!?`` stripped, lowercased."""
    return [w.strip(".,!?").lower() for w in text.split()]


def domain_document(rng: random.Random, config: WorldConfig, banned: set[str]) -> str:
    """``corpus_style=domain``: 1–3 sentences about letters, words, order and counting, mixed with
    lexicon sentences (``corpus_domain_rate``). A sentence with a word (case-folded, punctuation
    stripped) in ``banned`` — the input of any prompt of any split — is drawn again, so no input
    appears, let alone next to its answer; no sentence contains a colon."""
    sentences = []
    for _ in range(rng.randint(1, 3)):
        for _ in range(100):
            sentence = domain_sentence(rng, config)
            if not any(w in banned for w in words_of(sentence)):
                sentences.append(sentence)
                break
    if not sentences:  # only digits: never an input
        sentences.append(" ".join(str(rng.randint(0, 99)) for _ in range(3)) + ".")
    return (" " if rng.random() < 0.7 else "\n").join(sentences)


def make_world(config: WorldConfig, ctx: BuildContext) -> World:
    """Simulated labelers: string instructions, a gold judge, noisy demos and K-way rankings."""
    return World(config)


@hookimpl
def register_tasks(register: Any) -> None:
    register("world", make_world, config=WorldConfig)
