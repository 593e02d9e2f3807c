"""The sweep report: one row per arm, means over seeds with 95% t-intervals, the difference to a
baseline arm paired by seed, learning curves and the reward–KL frontier.

    instructrl report SWEEP_DIR [--metric NAME ...] [--baseline KEY=V,...] [--curve NAME ...]

writes ``report.md``, ``report.csv`` and ``plots/*.png`` into the sweep directory (``instructrl
sweep`` writes it at the end of every sweep). The statistics are small pure functions
(:func:`mean_interval`, :func:`paired_difference`, :func:`t_quantile`) with no dependency beyond
the standard library: the Student-t quantile is found by bisection on the t CDF, which is the
regularized incomplete beta function evaluated with its continued fraction.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from instructrl.core.errors import UserInputError, did_you_mean, one_of
from instructrl.core.hookspecs import hookimpl

DEFAULT_METRICS = (
    "eval/win_rate_vs_sft",
    "eval/gold_score",
    "eval/rm_score",
    "eval/kl_to_sft",
    "eval/pretrain_loss",
)
DEFAULT_CURVES = ("reward/raw", "kl/value")
LEVEL = 0.95
SWEEP_FILE = "sweep.json"
SFT = "sft"
"""``against: sft`` in a named comparison: each run's own figures of the SFT model (see :func:`sft_value`)."""


class ReportError(UserInputError):
    """A report cannot be made: not a sweep directory, an unknown baseline arm. Exit code 2."""


# ============================================================================================
# Statistics (pure functions)
# ============================================================================================


class Interval(NamedTuple):
    """A mean with a two-sided confidence interval; ``low``/``high`` are NaN when ``n < 2``."""

    mean: float
    low: float
    high: float
    n: int


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method).

    Converges fast for ``x < (a + 1) / (a + b + 2)``; Numerical Recipes §6.4 (``betacf``).
    """
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        # even step: d_{2m} = m (b − m) x / ((a + 2m − 1)(a + 2m))
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        # odd step: d_{2m+1} = −(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        step = d * c
        h *= step
        if abs(step - 1.0) < eps:
            break
    return h


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """``I_x(a, b) = B(x; a, b) / B(a, b)`` for ``a, b > 0`` and ``0 ≤ x ≤ 1``."""
    if a <= 0 or b <= 0:
        raise ValueError(f"a and b must be > 0 (got a={a}, b={b})")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    # symmetry I_x(a, b) = 1 − I_{1−x}(b, a) keeps the fraction in its fast region
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """``P(T ≤ t)`` for Student's t with ``df`` degrees of freedom.

    For ``t ≥ 0``: ``1 − ½ · I_{df/(df+t²)}(df/2, ½)``; the lower tail by symmetry.
    """
    if df <= 0:
        raise ValueError(f"df must be > 0 (got {df})")
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``t_{0.975, 4} = 2.776``).

    Bisection on :func:`student_t_cdf` to a relative precision of about 1e-12.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1) (got {p})")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


def mean_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean of ``values`` with the two-sided ``level`` Student-t interval.

    ``mean ± t_{(1+level)/2, n−1} · s / √n`` with ``s`` the sample standard deviation (n − 1
    denominator). With one value the interval is undefined (NaN); with none the mean is NaN too.
    """
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    s = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * s / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_difference(
    values: Mapping[int, float], baseline: Mapping[int, float], level: float = LEVEL
) -> Interval:
    """``values − baseline`` paired by seed: the mean difference over the seeds both have, with
    its t-interval (:func:`mean_interval` of the per-seed differences). Pairing removes the
    seed-to-seed variation the two arms share (same upstream models, same prompts per seed)."""
    seeds = sorted(set(values) & set(baseline))
    return mean_interval([values[s] - baseline[s] for s in seeds], level)


# ============================================================================================
# Reading a sweep directory
# ============================================================================================


@dataclass
class RunRecord:
    """One run of a sweep as the report sees it."""

    name: str
    arm: str
    seed: int
    status: str  # completed | failed | interrupted | pending | running
    error: str | None
    dir: Path
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepData:
    """``sweep.json`` plus every run's ``summary.json``."""

    dir: Path
    meta: dict[str, Any]
    arms: list[dict[str, Any]]  # {"name", "values": {key: value}}
    runs: list[RunRecord]

    @property
    def axes(self) -> list[str]:
        """The swept keys, in the order the arms list them."""
        keys: list[str] = []
        for arm in self.arms:
            keys += [k for k in arm["values"] if k not in keys]
        return keys

    def values(self, arm: str, metric: str) -> dict[int, float]:
        """``{seed: value}`` of a summary metric over the arm's completed runs."""
        out = {}
        for r in self.runs:
            if r.arm == arm and r.status == "completed":
                v = r.summary.get(metric)
                if _number(v):
                    out[r.seed] = float(v)
        return out

    def sft_values(self, arm: str, metric: str) -> dict[int, float]:
        """``{seed: value}`` of the SFT model's figure for ``metric`` in the arm's completed runs
        (:func:`sft_value`)."""
        out = {}
        for r in self.runs:
            if r.arm == arm and r.status == "completed" and (v := sft_value(r.summary, metric)) is not None:
                out[r.seed] = v
        return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def sft_value(summary: Mapping[str, Any], metric: str) -> float | None:
    """The SFT model's figure for ``metric`` in one run's summary: ``M_sft`` (``M_sft_greedy`` for
    ``M_greedy``), ½ for a win rate against SFT (SFT against itself), else ``None``."""
    if metric.startswith("eval/win_rate_vs_sft"):
        return 0.5
    base, greedy = (metric[: -len("_greedy")], "_greedy") if metric.endswith("_greedy") else (metric, "")
    v = summary.get(f"{base}_sft{greedy}")
    return float(v) if _number(v) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def load_sweep(sweep_dir: str | Path) -> SweepData:
    """Read a sweep directory; a directory without ``sweep.json`` is a :class:`ReportError`."""
    d = Path(sweep_dir)
    meta_path = d / SWEEP_FILE
    if not meta_path.is_file():
        raise ReportError(f"{d}: not a sweep directory (no {SWEEP_FILE}; made by `instructrl sweep`)")
    meta = _read_json(meta_path)
    if not meta.get("runs"):
        raise ReportError(f"{meta_path}: unreadable or has no runs")
    runs = []
    for r in meta["runs"]:
        run_dir = d / r["dir"]
        summary = _read_json(run_dir / "summary.json")
        status = "completed" if summary.get("run/status") == "completed" else r.get("status", "pending")
        runs.append(RunRecord(r["name"], r["arm"], int(r["seed"]), status, r.get("error"), run_dir, summary))
    return SweepData(d, meta, list(meta.get("arms", [])), runs)


def resolve_baseline(data: SweepData, spec: str | Mapping[str, Any] | None) -> str:
    """The baseline arm's name: ``spec`` as an arm name, ``KEY=V,...`` or a mapping matching one
    arm; default the sweep's recorded baseline, else the first arm."""
    names = [a["name"] for a in data.arms]
    if spec is None or spec == "":
        recorded = data.meta.get("baseline")
        return recorded if recorded in names else names[0]
    return match_arm(data.arms, spec, "--baseline")


def match_arm(arms: Sequence[Mapping[str, Any]], spec: str | Mapping[str, Any], what: str) -> str:
    """The one arm matching ``spec`` (an arm name, ``KEY=V,...`` or a mapping); else a ReportError."""
    names = [a["name"] for a in arms]
    if isinstance(spec, str) and spec in names:
        return spec
    if isinstance(spec, str):
        wanted: dict[str, Any] = {}
        for part in spec.split(","):
            key, eq, text = part.partition("=")
            if not eq or not key.strip():
                raise ReportError(
                    f"{what} '{spec}': expected an arm name or KEY=VALUE[,KEY=VALUE] (arms: {', '.join(names)})"
                )
            wanted[key.strip()] = typed_value(text.strip())
    else:
        wanted = dict(spec)
    axes = {k for a in arms for k in a["values"]}
    for key in wanted:
        if key not in axes:
            raise ReportError(
                f"{what}: '{key}' is not a sweep axis{did_you_mean(key, axes)} (axes: {one_of(axes)})"
            )
    hits = [a["name"] for a in arms if all(_same(a["values"].get(k), v) for k, v in wanted.items())]
    if len(hits) != 1:
        problem = "matches no arm" if not hits else f"matches {len(hits)} arms ({_few(hits)}); add keys"
        raise ReportError(f"{what} '{_spec_text(spec)}' {problem}; arms: {_few(names)}")
    return hits[0]


def _few(names: Sequence[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" … ({len(names)} in all)" if len(names) > n else "")


def _spec_text(spec: str | Mapping[str, Any]) -> str:
    return spec if isinstance(spec, str) else ",".join(f"{k}={v}" for k, v in spec.items())


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


def typed_value(text: str) -> Any:
    """A value typed as YAML types it (``0`` → int, ``27.8`` → float, ``k3`` → str, ``[a, b]`` →
    list); ``1e-5`` is a float as in OmegaConf (plain YAML 1.1 would leave it a string)."""
    import yaml

    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _FLOAT.match(value):
        return float(value)
    return value


# ============================================================================================
# The table
# ============================================================================================


@dataclass
class ArmRow:
    """One row of the report."""

    name: str
    values: dict[str, Any]
    baseline: bool
    seeds: int
    finished: int
    failed: int
    stats: dict[str, Interval]
    diffs: dict[str, Interval]


def build_rows(data: SweepData, metrics: Sequence[str], baseline: str) -> list[ArmRow]:
    """Per arm: run counts, each metric's mean with its interval, and the paired difference to
    ``baseline`` (every metric the baseline arm has)."""
    rows = []
    for arm in data.arms:
        runs = [r for r in data.runs if r.arm == arm["name"]]
        stats, diffs = {}, {}
        for m in metrics:
            vals = data.values(arm["name"], m)
            stats[m] = mean_interval([vals[s] for s in sorted(vals)])
            diffs[m] = paired_difference(vals, data.values(baseline, m))
        rows.append(
            ArmRow(
                arm["name"],
                dict(arm["values"]),
                arm["name"] == baseline,
                len(runs),
                sum(r.status == "completed" for r in runs),
                sum(r.status == "failed" for r in runs),
                stats,
                diffs,
            )
        )
    return rows


@dataclass
class ComparisonRow:
    """One named comparison: ``arm − against`` per metric, paired by seed."""

    name: str
    arm: str
    against: str  # an arm name or SFT
    diffs: dict[str, Interval]


def build_comparisons(data: SweepData, metrics: Sequence[str]) -> list[ComparisonRow]:
    """The sweep's named comparisons (``sweep.json`` ``comparisons``), each metric as the paired
    difference over seeds; ``against: sft`` pairs every run with its own SFT figures."""
    rows = []
    for name, pair in (data.meta.get("comparisons") or {}).items():
        arm, other = pair["arm"], pair["against"]
        diffs = {}
        for m in metrics:
            base = data.sft_values(arm, m) if other == SFT else data.values(other, m)
            diffs[m] = paired_difference(data.values(arm, m), base)
        rows.append(ComparisonRow(name, arm, other, diffs))
    return rows


def present_metrics(data: SweepData, metrics: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(metrics some completed run has, metrics none has)``."""
    have, missing = [], []
    for m in metrics:
        (have if any(data.values(a["name"], m) for a in data.arms) else missing).append(m)
    return have, missing


def fmt(x: float) -> str:
    """A number for the table: 4 significant digits, ``—`` for NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if x == 0:
        return "0"
    return f"{x:.4g}" if abs(x) >= 1e-3 else f"{x:.2e}"


def fmt_interval(iv: Interval, signed: bool = False) -> str:
    """``mean [low, high]``, or ``mean (n=1)`` when there is no interval."""
    if iv.n == 0:
        return "—"
    mean = ("+" if signed and iv.mean > 0 else "") + fmt(iv.mean)
    if iv.n < 2:
        return f"{mean} (n=1)"
    return f"{mean} [{fmt(iv.low)}, {fmt(iv.high)}]"


def csv_text(rows: Sequence[ArmRow], axes: Sequence[str], metrics: Sequence[str]) -> str:
    """``report.csv``: one row per arm; for each metric ``M``: ``M:mean``, ``M:ci_low``,
    ``M:ci_high``, ``M:n``, ``M:diff``, ``M:diff_ci_low``, ``M:diff_ci_high``, ``M:diff_n``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    header = ["arm", *axes, "baseline", "seeds", "finished", "failed"]
    for m in metrics:
        header += [f"{m}:{s}" for s in ("mean", "ci_low", "ci_high", "n")]
        header += [f"{m}:{s}" for s in ("diff", "diff_ci_low", "diff_ci_high", "diff_n")]
    w.writerow(header)

    def num(x: float) -> str:
        return "" if math.isnan(x) else repr(float(x))

    for r in rows:
        line = [r.name, *[_plain(r.values.get(a)) for a in axes], int(r.baseline)]
        line += [r.seeds, r.finished, r.failed]
        for m in metrics:
            s, d = r.stats[m], r.diffs[m]
            line += [num(s.mean), num(s.low), num(s.high), s.n]
            line += [num(d.mean), num(d.low), num(d.high), d.n]
        w.writerow(line)
    return buf.getvalue()


def _plain(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def markdown_text(
    data: SweepData,
    rows: Sequence[ArmRow],
    metrics: Sequence[str],
    missing: Sequence[str],
    baseline: str,
    plots: Sequence[str],
    plot_note: str | None,
    comparisons: Sequence[ComparisonRow] = (),
) -> str:
    """``report.md``: header, the metric table, the paired-difference table, the named
    comparisons, failures, plots."""
    meta = data.meta
    seeds = meta.get("seeds") or sorted({r.seed for r in data.runs})
    n_done = sum(r.status == "completed" for r in data.runs)
    n_failed = sum(r.status == "failed" for r in data.runs)
    out = [f"# Sweep report: {data.dir.name}", ""]
    if meta.get("command"):
        out += ["```", meta["command"], "```", ""]
    facts = [f"recipe `{meta.get('recipe')}`"]
    if meta.get("smoke"):
        facts.append("`--smoke`")
    if meta.get("overrides"):
        facts.append("fixed: " + " ".join(f"`{o}`" for o in meta["overrides"]))
    out.append(" · ".join(facts))
    out.append(
        f"{len(data.arms)} arms × {len(seeds)} seeds ({', '.join(map(str, seeds))}) = {len(data.runs)} runs: "
        f"{n_done} finished, {n_failed} failed"
        + (
            f", {len(data.runs) - n_done - n_failed} not finished"
            if n_done + n_failed < len(data.runs)
            else ""
        )
        + f" · baseline arm: `{baseline}`"
    )
    out.append("")
    out.append("## Metrics (mean over seeds [95% t-interval])")
    out.append("")
    head = ["arm", "finished", "failed", *[f"`{m}`" for m in metrics]]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for r in rows:
        name = f"`{r.name}`" + (" (baseline)" if r.baseline else "")
        cells = [name, f"{r.finished}/{r.seeds}", str(r.failed)]
        cells += [fmt_interval(r.stats[m]) for m in metrics]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append(f"## Difference to the baseline `{baseline}` (paired by seed [95% t-interval])")
    out.append("")
    head = ["arm", *[f"Δ `{m}`" for m in metrics]]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for r in rows:
        if r.baseline:
            continue
        cells = [f"`{r.name}`", *[fmt_interval(r.diffs[m], signed=True) for m in metrics]]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append(
        "Intervals: mean ± t₀.₉₇₅,ₙ₋₁ · s/√n over the finished seeds (s: sample standard deviation). "
        "Differences: the same over the per-seed differences arm − baseline, for the seeds both "
        "finished. `—`: no finished seed has the metric; `(n=1)`: one seed, no interval."
    )
    if comparisons:
        out += ["", "## Named comparisons (arm − against, paired by seed [95% t-interval])", ""]
        head = ["comparison", "arm", "against", *[f"Δ `{m}`" for m in metrics]]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for c in comparisons:
            against = "SFT (each run's own `*_sft` figures)" if c.against == SFT else f"`{c.against}`"
            cells = [c.name, f"`{c.arm}`", against, *[fmt_interval(c.diffs[m], signed=True) for m in metrics]]
            out.append("| " + " | ".join(cells) + " |")
    if missing:
        out += ["", "Not reported (no finished run has them): " + ", ".join(f"`{m}`" for m in missing)]
    failed = [r for r in data.runs if r.status == "failed"]
    if failed:
        out += ["", "## Failed runs", "", "| run | error |", "|---|---|"]
        out += [f"| `{r.name}` | {(r.error or '').replace('|', '/')} |" for r in failed]
    unfinished = [r for r in data.runs if r.status not in ("completed", "failed")]
    if unfinished:
        out += ["", "Not finished: " + ", ".join(f"`{r.name}` ({r.status})" for r in unfinished)]
    out += ["", "## Plots", ""]
    if plot_note:
        out.append(plot_note)
    for p in plots:
        out.append(f"![{Path(p).stem}]({p})")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# ============================================================================================
# Learning curves
# ============================================================================================


def read_curve(metrics_csv: Path) -> dict[str, dict[int, float]]:
    """``{metric: {iteration: value}}`` from a stage's Lightning ``metrics.csv`` (rows without an
    ``iteration`` are skipped; for an iteration logged on several rows the last value wins)."""
    out: dict[str, dict[int, float]] = {}
    try:
        with open(metrics_csv, newline="") as f:
            for row in csv.DictReader(f):
                it = row.get("iteration")
                if it in (None, ""):
                    continue
                i = int(float(it))
                for k, v in row.items():
                    if k in ("iteration", "step", "epoch") or v in (None, ""):
                        continue
                    try:
                        out.setdefault(k, {})[i] = float(v)
                    except ValueError:
                        continue
    except OSError:
        return {}
    return out


def aggregate_curve(
    curves: Sequence[Mapping[int, float]], level: float = LEVEL
) -> list[tuple[int, Interval]]:
    """Per iteration, the mean over the seeds that logged it with its t-interval."""
    its = sorted({i for c in curves for i in c})
    return [(i, mean_interval([c[i] for c in curves if i in c], level)) for i in its]


def run_curves(data: SweepData) -> dict[str, list[dict[str, dict[int, float]]]]:
    """``{arm: [curves of each completed run]}`` from ``RUN/rl/metrics.csv``."""
    out: dict[str, list[dict[str, dict[int, float]]]] = {a["name"]: [] for a in data.arms}
    for r in data.runs:
        if r.status == "completed":
            c = read_curve(r.dir / "rl" / "metrics.csv")
            if c:
                out.setdefault(r.arm, []).append(c)
    return out


# ============================================================================================
# Plots
# ============================================================================================


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def _new_figure(width: float, height: float) -> Any:
    """A matplotlib figure on the Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_curves(
    data: SweepData, curves: Sequence[str], out_dir: Path, baseline: str | None = None
) -> list[Path]:
    """One PNG per curve metric: mean over seeds per arm with the 95% band (``curve_<metric>.png``)."""
    per_arm = run_curves(data)
    written = []
    for metric in curves:
        series = {arm: [c[metric] for c in cs if metric in c] for arm, cs in per_arm.items()}
        if not any(series.values()):
            continue
        from matplotlib.ticker import MaxNLocator

        fig = _new_figure(6.4, 4.0)
        ax = fig.subplots()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for i, (arm, cs) in enumerate(series.items()):
            if not cs:
                continue
            agg = aggregate_curve(cs)
            x = [it for it, _ in agg]
            mean = [iv.mean for _, iv in agg]
            (line,) = ax.plot(x, mean, marker="o", ms=3, label=_label(arm, baseline), color=f"C{i % 10}")
            lo = [iv.low if iv.n > 1 else iv.mean for _, iv in agg]
            hi = [iv.high if iv.n > 1 else iv.mean for _, iv in agg]
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
        ax.set_xlabel("RL iteration")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric}: mean over seeds, 95% band")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"curve_{_slug(metric)}.png"
        fig.savefig(path)
        written.append(path)
    return written


def _label(arm: str, baseline: str | None) -> str:
    return f"{arm} (baseline)" if arm == baseline else arm


def plot_frontier(data: SweepData, out_dir: Path, baseline: str | None = None) -> Path | None:
    """Gold score and RM score against KL to SFT, per arm: each seed's final evaluation (small
    dots), their mean (large marker) and, when logged, the periodic evaluations during RL (mean over
    seeds per iteration, a thin line). The RM score rising while the gold score falls as KL grows
    is over-optimisation of the reward model."""
    from matplotlib.ticker import MaxNLocator

    kl = "eval/kl_to_sft"
    panels = [("eval/gold_score", "gold score"), ("eval/rm_score", "reward-model score")]
    if not any(data.values(a["name"], kl) for a in data.arms):
        return None
    per_arm = run_curves(data)
    fig = _new_figure(10.0, 4.2)
    axes = fig.subplots(1, 2)
    for ax, (metric, label) in zip(axes, panels):
        for i, arm in enumerate(a["name"] for a in data.arms):
            color = f"C{i % 10}"
            path_x, path_y = [], []
            for it in sorted({it for c in per_arm.get(arm, []) for it in c.get(kl, {})}):
                pairs = [
                    (c[kl][it], c[metric][it])
                    for c in per_arm[arm]
                    if it in c.get(kl, {}) and it in c.get(metric, {})
                ]
                if pairs:
                    path_x.append(sum(p[0] for p in pairs) / len(pairs))
                    path_y.append(sum(p[1] for p in pairs) / len(pairs))
            if path_x:
                ax.plot(path_x, path_y, color=color, alpha=0.45, lw=1, marker=".", ms=4)
            xv, yv = data.values(arm, kl), data.values(arm, metric)
            seeds = sorted(set(xv) & set(yv))
            if not seeds:
                continue
            ax.scatter([xv[s] for s in seeds], [yv[s] for s in seeds], color=color, s=12, alpha=0.5)
            mx = sum(xv[s] for s in seeds) / len(seeds)
            my = sum(yv[s] for s in seeds) / len(seeds)
            ax.scatter([mx], [my], color=color, s=70, edgecolors="black", linewidths=0.6,
                       label=_label(arm, baseline), zorder=3)  # fmt: skip
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.set_xlabel("KL to SFT (nats / response)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs KL to SFT")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        "Reward–KL frontier: large = mean over seeds, small = seeds, line = periodic eval during RL",
        fontsize=9,
    )
    fig.tight_layout()
    path = out_dir / "frontier.png"
    fig.savefig(path)
    return path


def write_plots(
    data: SweepData, curves: Sequence[str], baseline: str | None = None
) -> tuple[list[str], str | None]:
    """Write ``plots/*.png``; return their paths relative to the sweep dir and a note (or None)."""
    out_dir = data.dir / "plots"
    out_dir.mkdir(exist_ok=True)
    for old in [*out_dir.glob("curve_*.png"), out_dir / "frontier.png"]:
        old.unlink(missing_ok=True)
    written: list[Path] = []
    frontier = plot_frontier(data, out_dir, baseline)
    if frontier is not None:
        written.append(frontier)
    written += plot_curves(data, list(dict.fromkeys(curves)), out_dir, baseline)  # each curve once
    note = None if written else "No plots: no finished run has RL metrics or an evaluation."
    return [str(p.relative_to(data.dir)) for p in written], note


# ============================================================================================
# Entry points
# ============================================================================================


def write_report(
    sweep_dir: str | Path,
    metrics: Sequence[str] | None = None,
    baseline: str | Mapping[str, Any] | None = None,
    curves: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write ``report.md``, ``report.csv`` and ``plots/*.png`` into ``sweep_dir``.

    ``metrics`` default to the sweep's own (``--metric``), else :data:`DEFAULT_METRICS`; metrics no
    finished run has are left out (and listed). ``curves``: ``RUN/rl/metrics.csv`` columns to plot
    (default :data:`DEFAULT_CURVES` plus the chosen metrics logged by the periodic evaluation).
    Returns ``{"markdown", "csv", "plots", "rows", "comparisons", "metrics", "missing", "baseline", "note"}``.
    """
    data = load_sweep(sweep_dir)
    chosen = list(metrics or data.meta.get("metrics") or DEFAULT_METRICS)
    base = resolve_baseline(data, baseline)
    have, missing = present_metrics(data, chosen)
    rows = build_rows(data, have, base)
    if curves is None:
        curves = list(data.meta.get("curves") or DEFAULT_CURVES) + [
            m for m in have if m not in DEFAULT_CURVES
        ]
    plots, note = write_plots(data, curves, base)
    comparisons = build_comparisons(data, have)
    md = markdown_text(data, rows, have, missing, base, plots, note, comparisons)
    (data.dir / "report.md").write_text(md)
    (data.dir / "report.csv").write_text(csv_text(rows, data.axes, have))
    return {
        "markdown": data.dir / "report.md",
        "csv": data.dir / "report.csv",
        "plots": [data.dir / p for p in plots],
        "rows": rows,
        "comparisons": comparisons,
        "metrics": have,
        "missing": missing,
        "baseline": base,
        "note": note,
    }


def summary_lines(result: Mapping[str, Any]) -> list[str]:
    """A compact console table of the report (first metric columns) and where the files are."""
    metrics = list(result["metrics"])[:3]
    rows = result["rows"]
    width = max([len("arm"), *(len(r.name) for r in rows)])
    head = f"{'arm':<{width}}  ok/all  " + "  ".join(f"{m:<26}" for m in metrics)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "  ".join(f"{fmt_interval(r.stats[m]):<26}" for m in metrics)
        lines.append(f"{r.name:<{width}}  {r.finished}/{r.seeds:<4}  {cells}")
    lines.append(f"report: {result['markdown']} (+ report.csv, plots/)")
    if result.get("note"):
        lines.append(result["note"])
    return lines


def cmd_report(args: argparse.Namespace) -> int:
    """``instructrl report SWEEP_DIR``: (re)write the report; print its table."""
    result = write_report(args.sweep_dir, args.metric or None, args.baseline, args.curve or None)
    print("\n".join(summary_lines(result)))
    return 0


class ReportCommand:
    """``instructrl report``: (re)write ``report.md`` / ``report.csv`` / ``plots/`` of a sweep dir."""

    # --baseline takes KEY=V[,KEY=V] text: not a recipe override
    key_value_options: tuple[str, ...] = ("--baseline",)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The ``instructrl report`` arguments."""
        parser.add_argument("sweep_dir")
        parser.add_argument(
            "--metric",
            action="append",
            help=f"summary metric to report (repeatable; default: {', '.join(DEFAULT_METRICS)})",
        )
        parser.add_argument(
            "--baseline", help="baseline arm: its name or KEY=V[,KEY=V] (default: the sweep's)"
        )
        parser.add_argument(
            "--curve", action="append", help="RL metrics.csv column to plot per iteration (repeatable)"
        )
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    def run(self, args: argparse.Namespace) -> int:
        """Write the report; exit code 0."""
        return cmd_report(args)


@hookimpl
def register_commands(register: Callable[..., None]) -> None:
    """``instructrl report``."""
    register("report", ReportCommand(), description="write report.md / report.csv / plots for a sweep dir")
