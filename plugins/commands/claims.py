"""``instructrl claims SWEEP_DIR``: the paper's claims, checked on a finished ``instructgpt_claims``
sweep (``make reproduce``), written as one markdown report with its plots (docs/results.md).

The sweep's named comparisons say which arm plays which part (``ppo_ptx_vs_sft``, ``ppo_vs_sft``,
``ppo_ptx_vs_ppo``, ``beta2_vs_ppo``); every figure is a mean over seeds with a 95% t-interval,
every difference paired by seed (:mod:`instructrl.plugins.commands.report`). The targets:

- (a) PPO-ptx beats SFT: win rate ≥ 0.65 with the interval's lower bound > 0.55; strict wins ≥ 2×
  strict losses; gold content above SFT's (paired interval excludes 0);
- (b) the alignment tax: PPO raises the pretraining-text loss above SFT's (interval excludes 0),
  PPO-ptx recovers ≥ 50% of the rise, and its win rate is at most 0.03 below PPO's;
- (c) a larger β alone (β = 2): its pretraining loss against the PPO arm's (win rate, loss) curve
  interpolated at the β = 2 arm's final win rate (reported, not gated);
- (d) over-optimisation: Gao et al.'s ``R(d) = d(α − β log d)``, ``d = √KL``, fitted to the PPO
  arm's in-run gold and RM scores (reported, not gated);
- (e) RM accuracy vs gold ≥ 0.75 overall and ≥ 0.65 on same-format pairs, beside the labeler ceiling;
- (f) the RL init keeps the pretraining loss ≤ 1.5× the base model's, its gold score ≥ 0.95× SFT's.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructrl.core.hookspecs import hookimpl

from . import report
from .report import Interval, ReportError, SweepData, fmt, fmt_interval, mean_interval, paired_difference

ROLES = {"ppo_ptx": "ppo_ptx_vs_sft", "ppo": "ppo_vs_sft", "beta2": "beta2_vs_ppo"}
"""Each arm's part, read from the comparison that names it as ``arm``."""

OPTIONAL_ROLES = ("beta2",)
"""Parts a smaller claims sweep may leave out (its rows then say so): (c) needs the β = 2 arm."""

CURVE_KEYS = (
    "eval/kl_to_ref",
    "eval/gold_score",
    "eval/rm_score",
    "eval/win_rate_vs_sft",
    "eval/pretrain_loss",
)


# ============================================================================================
# Pure maths
# ============================================================================================


def fit_gao(d: Sequence[float], r: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``(α, β)`` of Gao et al.'s RL form ``R(d) = d(α − β log d)``.

    ``d``: ``(n,)`` distances ``√KL`` (> 0; points at 0 carry no information, R(0) = 0 by the form);
    ``r``: ``(n,)`` score gains over the start. The form is linear in ``(α, β)`` with features
    ``(d, −d log d)``: the 2 × 2 normal equations, solved in closed form. Needs two points with
    distinct ``d`` (else ``ValueError``).
    """
    pts = [(x, y) for x, y in zip(d, r, strict=True) if x > 0]
    f = [(x, -x * math.log(x), y) for x, y in pts]
    saa = math.fsum(a * a for a, _, _ in f)
    sab = math.fsum(a * b for a, b, _ in f)
    sbb = math.fsum(b * b for _, b, _ in f)
    say = math.fsum(a * y for a, _, y in f)
    sby = math.fsum(b * y for _, b, y in f)
    det = saa * sbb - sab * sab
    if len(f) < 2 or abs(det) <= 1e-12 * max(saa * sbb, 1e-300):
        raise ValueError(f"fit_gao: needs two points with distinct d > 0 (got {len(f)})")
    return (say * sbb - sby * sab) / det, (saa * sby - sab * say) / det


def recovered_share(
    taxed: Mapping[int, float], mixed: Mapping[int, float], reference: Mapping[int, float]
) -> Interval:
    """Per seed, the share of the rise ``taxed − reference`` that ``mixed`` takes back:
    ``(taxed − mixed) / (taxed − reference)`` (seeds with no rise left out), as a mean with its
    interval over the seeds all three have."""
    seeds = sorted(set(taxed) & set(mixed) & set(reference))
    return mean_interval(
        [(taxed[s] - mixed[s]) / (taxed[s] - reference[s]) for s in seeds if taxed[s] != reference[s]]
    )


def gao(d: float, alpha: float, beta: float) -> float:
    """``d(α − β log d)`` (0 at d = 0)."""
    return 0.0 if d <= 0 else d * (alpha - beta * math.log(d))


def interpolate_at(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """``y`` where the polyline ``(xs, ys)`` (in its own order, e.g. iterations) first reaches
    ``x``, linearly between the two points around it; ``None`` when it never does."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        lo, hi = min(x0, x1), max(x0, x1)
        if lo <= x <= hi:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


# ============================================================================================
# Reading the sweep
# ============================================================================================


@dataclass
class Roles:
    """The arm names of the claims sweep's parts."""

    ppo_ptx: str
    ppo: str
    beta2: str | None = None


def roles(data: SweepData) -> Roles:
    """The arms by part, from the sweep's named comparisons; a :class:`ReportError` naming what
    is missing when the sweep is not a claims sweep (only the β = 2 arm may be absent)."""
    comps = data.meta.get("comparisons") or {}
    out = {}
    for part, name in ROLES.items():
        if name not in comps:
            if part in OPTIONAL_ROLES:
                continue
            raise ReportError(
                f"{data.dir}: the sweep has no comparison '{name}' (the claims report reads "
                "an `instructrl sweep instructgpt_claims` directory)"
            )
        out[part] = comps[name]["arm"]
    return Roles(**out)


def curve(run: report.RunRecord) -> list[dict[str, float]]:
    """The run's in-run evaluations (``rl/metrics.csv`` rows with ``eval/kl_to_ref``), preceded by
    the RL start (KL 0; its final-eval figures ``eval/rl_start/*``): ``[{key: value}]``."""
    table = report.read_curve(run.dir / "rl" / "metrics.csv")
    iters = sorted(table.get("eval/kl_to_ref", {}))
    start = {k: run.summary.get(f"eval/rl_start/{k.removeprefix('eval/')}") for k in CURVE_KEYS}
    start["eval/kl_to_ref"] = 0.0
    points = [dict(start, iteration=-1)] if all(report._number(v) for v in start.values()) else []
    for it in iters:
        row = {k: table.get(k, {}).get(it, math.nan) for k in CURVE_KEYS}
        points.append(dict(row, iteration=it))
    return points


def mean_curve(runs: Sequence[report.RunRecord]) -> list[dict[str, float]]:
    """Per evaluation point (same iteration in every run), the mean over the runs."""
    curves = [curve(r) for r in runs]
    curves = [c for c in curves if c]
    if not curves:
        return []
    n = min(len(c) for c in curves)
    return [
        {k: math.fsum(c[i][k] for c in curves) / len(curves) for k in (*CURVE_KEYS, "iteration")}
        for i in range(n)
    ]


# ============================================================================================
# The checks
# ============================================================================================


@dataclass
class Check:
    """One line of the targets table."""

    target: str
    quantity: str
    value: str
    ok: bool | None  # None: reported, not gated


def _per_seed(data: SweepData, arm: str, fn: Callable[[Mapping[str, Any]], float | None]) -> dict[int, float]:
    out = {}
    for r in data.runs:
        if r.arm == arm and r.status == "completed":
            v = fn(r.summary)
            if v is not None and math.isfinite(v):
                out[r.seed] = v
    return out


def _get(key: str) -> Callable[[Mapping[str, Any]], float | None]:
    return lambda s: float(s[key]) if report._number(s.get(key)) else None


def _ratio(num: str, den: str) -> Callable[[Mapping[str, Any]], float | None]:
    def f(s: Mapping[str, Any]) -> float | None:
        a, b = _get(num)(s), _get(den)(s)
        return None if a is None or b is None or b == 0 else a / b

    return f


def _iv(values: Mapping[int, float]) -> Interval:
    return mean_interval([values[s] for s in sorted(values)])


def _above(iv: Interval, bound: float) -> bool | None:
    """The interval's lower bound above ``bound`` (``None`` without an interval)."""
    return iv.low > bound if iv.n > 1 else None


def _ge(iv: Interval, bound: float) -> bool | None:
    return None if math.isnan(iv.mean) else iv.mean >= bound


def checks(data: SweepData) -> tuple[list[Check], dict[str, Any]]:
    """The targets table and the figures behind the plots (``curves``, ``gao``)."""
    ro = roles(data)
    out: list[Check] = []
    sft = lambda key: data.sft_values(ro.ppo_ptx, key)  # noqa: E731 — each run's own SFT figures

    # (a) PPO-ptx beats SFT
    win = _iv(data.values(ro.ppo_ptx, "eval/win_rate_vs_sft"))
    out.append(
        Check(
            "(a)",
            "PPO-ptx win rate vs SFT (T = 1)",
            fmt_interval(win),
            _ge(win, 0.65) and win.low > 0.55 if win.n > 1 else None,
        )
    )
    sw, sl = _iv(data.values(ro.ppo_ptx, "eval/strict_win")), _iv(data.values(ro.ppo_ptx, "eval/strict_loss"))
    out.append(
        Check(
            "(a)",
            "PPO-ptx strict wins / strict losses",
            f"{fmt(sw.mean)} / {fmt(sl.mean)}",
            None if math.isnan(sw.mean) else sw.mean >= 2 * sl.mean,
        )
    )
    content = paired_difference(data.values(ro.ppo_ptx, "eval/gold_content"), sft("eval/gold_content"))
    out.append(
        Check(
            "(a)",
            "gold content: PPO-ptx − SFT (paired)",
            fmt_interval(content, signed=True),
            _above(content, 0.0),
        )
    )

    # (b) the alignment tax
    ppo_loss, ptx_loss = (
        data.values(ro.ppo, "eval/pretrain_loss"),
        data.values(ro.ppo_ptx, "eval/pretrain_loss"),
    )
    rise = paired_difference(ppo_loss, data.sft_values(ro.ppo, "eval/pretrain_loss"))  # each run's own SFT
    out.append(
        Check(
            "(b)",
            "pretraining loss: PPO − SFT (paired)",
            fmt_interval(rise, signed=True),
            _above(rise, 0.0),
        )
    )
    rec = recovered_share(ppo_loss, ptx_loss, data.sft_values(ro.ppo, "eval/pretrain_loss"))
    out.append(Check("(b)", "share of the rise PPO-ptx recovers", fmt_interval(rec), _ge(rec, 0.5)))
    # the miniature's plain SFT model forgets the language (docs/instructgpt.md), so the tax is also
    # reported against the policy's start, the RL init
    start_loss = _per_seed(data, ro.ppo, _get("eval/rl_start/pretrain_loss"))
    rise0 = paired_difference(ppo_loss, start_loss)
    out.append(
        Check(
            "(b)",
            "pretraining loss: PPO − its start, the RL init (paired)",
            fmt_interval(rise0, signed=True),
            None,
        )
    )
    rec0 = recovered_share(ppo_loss, ptx_loss, start_loss)
    out.append(Check("(b)", "share of that rise PPO-ptx recovers", fmt_interval(rec0), None))
    gap = paired_difference(
        data.values(ro.ppo_ptx, "eval/win_rate_vs_sft"), data.values(ro.ppo, "eval/win_rate_vs_sft")
    )
    out.append(
        Check(
            "(b)",
            "win rate: PPO-ptx − PPO (paired)",
            fmt_interval(gap, signed=True),
            None if gap.n < 2 else gap.low >= -0.03,
        )
    )

    # (c) β = 2 at equal win rate
    ppo_runs = {r.seed: r for r in data.runs if r.arm == ro.ppo and r.status == "completed"}
    b2 = {r.seed: r for r in data.runs if r.arm == ro.beta2 and r.status == "completed"}
    at_equal = {}
    for seed in sorted(set(ppo_runs) & set(b2)):
        pts = curve(ppo_runs[seed])
        w2, l2 = _get("eval/win_rate_vs_sft")(b2[seed].summary), _get("eval/pretrain_loss")(b2[seed].summary)
        if pts and w2 is not None and l2 is not None:
            l_ppo = interpolate_at(
                [p["eval/win_rate_vs_sft"] for p in pts], [p["eval/pretrain_loss"] for p in pts], w2
            )
            if l_ppo is not None:
                at_equal[seed] = l2 - l_ppo
    eq = mean_interval([at_equal[s] for s in sorted(at_equal)])
    out.append(
        Check(
            "(c)",
            f"pretraining loss: β = 2 − PPO at β = 2's win rate ({len(at_equal)} seeds on the curve)",
            fmt_interval(eq, signed=True) if ro.beta2 else "no β = 2 arm in this sweep (no beta2_vs_ppo)",
            None,
        )
    )

    # (d) over-optimisation on the PPO arm's mean curve
    mc = mean_curve(list(ppo_runs.values()))
    gao_fit: dict[str, tuple[float, float] | None] = {}
    if mc:
        d = [math.sqrt(max(p["eval/kl_to_ref"], 0.0)) for p in mc]
        for key in ("eval/gold_score", "eval/rm_score"):
            r = [p[key] - mc[0][key] for p in mc]
            try:
                gao_fit[key] = fit_gao(d, r)
            except ValueError:
                gao_fit[key] = None
        golds = [p["eval/gold_score"] for p in mc]
        peak = max(range(len(golds)), key=golds.__getitem__)
        up_to = peak + 2 if peak < len(golds) - 1 else None  # from KL 0 to the first point past the peak
        seen = (
            f"peak at point {peak + 1} (√KL {d[peak]:.2f}); {up_to} points from KL 0 to past it"
            if up_to
            else "no peak: still rising at the last point"
        )
        out.append(
            Check(
                "(d)",
                f"PPO gold curve: {len(mc)} points, √KL up to {max(d):.2f} (≥ 6 to past the peak)",
                seen,
                None if up_to is None else up_to >= 6,
            )
        )
        for key, label in (("eval/gold_score", "gold"), ("eval/rm_score", "RM")):
            f = gao_fit.get(key)
            out.append(
                Check(
                    "(d)",
                    f"Gao fit, {label}: α, β",
                    "–" if f is None else f"α = {f[0]:.3f}, β = {f[1]:.3f}",
                    None,
                )
            )

    # (e) the reward model
    acc, same = _iv(data.values(ro.ppo, "rm/accuracy")), _iv(data.values(ro.ppo, "rm/accuracy/same_format"))
    ceil = _iv(data.values(ro.ppo, "rm/labeler_ceiling"))
    out.append(
        Check(
            "(e)",
            f"RM accuracy vs gold (labeler ceiling {fmt(ceil.mean)})",
            fmt_interval(acc),
            _ge(acc, 0.75),
        )
    )
    out.append(Check("(e)", "RM accuracy on same-format pairs", fmt_interval(same), _ge(same, 0.65)))

    # (f) the RL init
    lr = _iv(_per_seed(data, ro.ppo, _ratio("eval/rl_start/pretrain_loss", "eval/pretrain_loss_base")))
    out.append(
        Check(
            "(f)",
            "RL init pretraining loss ÷ base model's",
            fmt_interval(lr),
            None if math.isnan(lr.mean) else lr.mean <= 1.5,
        )
    )
    gr = _iv(_per_seed(data, ro.ppo, _ratio("eval/rl_start/gold_score", "eval/gold_score_sft")))
    out.append(Check("(f)", "RL init gold score ÷ SFT's", fmt_interval(gr), _ge(gr, 0.95)))
    return out, {"curve": mc, "gao": gao_fit, "roles": ro}  # fmt: skip


# ============================================================================================
# The report
# ============================================================================================


def _provenance(data: SweepData) -> dict[str, Any]:
    import yaml

    for r in data.runs:
        path = r.dir / "config.yaml"
        if r.status == "completed" and path.is_file():
            prov = (yaml.safe_load(path.read_text()) or {}).get("provenance") or {}
            if isinstance(prov, dict):
                return prov
    return {}


def plot_overoptimisation(figures: Mapping[str, Any], path: Path) -> bool:
    """Gold and RM score gains of the PPO arm against √KL with the fitted Gao curves."""
    mc = figures["curve"]
    if not mc:
        return False
    fig = report._new_figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    d = [math.sqrt(max(p["eval/kl_to_ref"], 0.0)) for p in mc]
    top = max(d) * 1.05 or 1.0
    grid = [top * i / 100 for i in range(101)]
    for key, label, colour in (
        ("eval/gold_score", "gold", "tab:blue"),
        ("eval/rm_score", "RM (proxy)", "tab:orange"),
    ):
        r = [p[key] - mc[0][key] for p in mc]
        ax.plot(d, r, "o", color=colour, label=f"{label} (in-run evaluations)")
        if (f := figures["gao"].get(key)) is not None:
            ax.plot(
                grid,
                [gao(x, *f) for x in grid],
                "-",
                color=colour,
                alpha=0.6,
                label=f"{label}: d(α − β log d)",
            )
    ax.set_xlabel("d = √KL(π ‖ π_init)  [√nats]")
    ax.set_ylabel("score − score at the start")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def results_text(data: SweepData, out: Path, plot: str | None) -> str:
    """The results markdown: header (commit, CPU, wall time, seeds), targets, the sweep's tables."""
    table, figures = checks(data)
    prov = _provenance(data)
    seeds = data.meta.get("seeds") or sorted({r.seed for r in data.runs})
    done = sum(r.status == "completed" for r in data.runs)
    wall = data.meta.get("wall_s")
    lines = [
        "# Results: the paper's claims in miniature",
        "",
        "Regenerated by `make reproduce` (`instructrl sweep instructgpt_claims`, then "
        f"`instructrl claims {data.dir}`); see docs/instructgpt.md for the claims and docs/world.md for the world.",
        "",
        f"- commit `{prov.get('git_commit') or 'unknown'}`, instructrl {prov.get('instructrl', '?')}, "
        f"torch {prov.get('torch', '?')}, transformers {prov.get('transformers', '?')}",
        f"- CPU: {prov.get('cpu') or 'not recorded'}",
        f"- wall time of the sweep: {'not recorded' if wall is None else f'{wall / 60:.1f} min'}; "
        f"seeds {', '.join(map(str, seeds))}; {done}/{len(data.runs)} runs finished",
        f"- arms: PPO-ptx `{figures['roles'].ppo_ptx}`, PPO `{figures['roles'].ppo}`, β = 2 `{figures['roles'].beta2 or 'none'}`; "
        "SFT is each run's own SFT model (the baseline of every win rate)",
        "",
        "## Targets",
        "",
        "| | quantity | value (mean [95% interval] over seeds) | target |",
        "|---|---|---|---|",
    ]
    for c in table:
        mark = "reported" if c.ok is None else ("met" if c.ok else "**missed**")
        lines.append(f"| {c.target} | {c.quantity} | {c.value} | {mark} |")
    lines += [
        "",
        "(c) is the paper's appendix E.6 (a larger KL coefficient alone does not remove the regression at "
        "equal win rate): a difference whose interval holds 0 agrees with it, a negative one says the "
        "miniature disagrees. (d): the PPO arm's in-run evaluations (mean over seeds), the start at KL 0.",
        "",
    ]
    if plot:
        lines += [f"![over-optimisation]({plot})", ""]
    sweep_md = data.dir / "report.md"
    if sweep_md.is_file():
        body = sweep_md.read_text().split("\n", 1)[1]
        rel = Path(os.path.relpath(data.dir.resolve(), out.resolve().parent)).as_posix()
        body = (
            body.replace("](plots/", f"]({rel}/plots/").replace("\n# ", "\n### ").replace("\n## ", "\n### ")
        )
        lines += ["## The sweep's report", "", body.strip()]
    return "\n".join(lines).rstrip() + "\n"


def write_results(sweep_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the results markdown (default ``SWEEP/results.md``) and its plots: the over-optimisation
    plot and copies of the sweep's plots, in ``img/`` beside it (``img/<stem>_<plot>.png``), so the
    markdown stands on its own when the sweep directory is not kept."""
    data = report.load_sweep(sweep_dir)
    report.write_report(data.dir)  # the sweep's own tables, current
    data = report.load_sweep(sweep_dir)
    path = Path(out) if out else data.dir / "results.md"
    _, figures = checks(data)
    img = path.parent / "img"
    png = img / f"{path.stem}_overoptimisation.png"
    plot = f"img/{png.name}" if plot_overoptimisation(figures, png) else None
    text = results_text(data, path, plot)
    img.mkdir(parents=True, exist_ok=True)
    for old in img.glob(f"{path.stem}_sweep_*.png"):
        old.unlink()
    for src in sorted((data.dir / "plots").glob("*.png")):
        shutil.copyfile(src, img / f"{path.stem}_sweep_{src.name}")
        rel = Path(os.path.relpath(src.resolve(), path.resolve().parent)).as_posix()
        text = text.replace(f"]({rel})", f"](img/{path.stem}_sweep_{src.name})")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


class ClaimsCommand:
    """``instructrl claims SWEEP_DIR [--out FILE]``: the paper's claims on a claims sweep."""

    key_value_options: tuple[str, ...] = ()

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The ``instructrl claims`` arguments."""
        parser.add_argument("sweep_dir", help="a finished `instructrl sweep instructgpt_claims` directory")
        parser.add_argument("--out", help="the markdown file to write (default: SWEEP_DIR/results.md)")
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    def run(self, args: argparse.Namespace) -> int:
        """Write the results; print the targets table; exit code 0."""
        path = write_results(args.sweep_dir, args.out)
        table, _ = checks(report.load_sweep(args.sweep_dir))
        for c in table:
            mark = "reported" if c.ok is None else ("met" if c.ok else "MISSED")
            print(f"{c.target} {c.quantity:<70} {c.value:<34} {mark}")
        print(f"results: {path}")
        return 0


@hookimpl
def register_commands(register: Callable[..., None]) -> None:
    """``instructrl claims``."""
    register("claims", ClaimsCommand(), description="check the paper's claims on an instructgpt_claims sweep")
