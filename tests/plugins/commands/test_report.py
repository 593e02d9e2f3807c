"""The sweep report: the t quantile against table values and closed forms, intervals and paired
differences worked out by hand, and report.md / report.csv / plots from a sweep directory written
by hand (no runs)."""

from __future__ import annotations

import csv
import json
import math
import random

import pytest
from instructrl.core.cli import main
from instructrl.plugins.commands import report
from instructrl.plugins.commands.report import (
    Interval,
    mean_interval,
    paired_difference,
    student_t_cdf,
    t_quantile,
)

# ---------------------------------------------------------------------------------------------
# Student t


@pytest.mark.parametrize(
    ("df", "table"),
    [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (29, 2.045), (120, 1.980)],
)
def test_t_quantile_matches_the_table(df, table):
    assert t_quantile(0.975, df) == pytest.approx(table, abs=5e-4)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995, 0.9995])
def test_t_quantile_matches_closed_forms(p):
    # df = 1 is the Cauchy distribution: F⁻¹(p) = tan(π (p − ½))
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)
    # df = 2: F⁻¹(p) = (2p − 1) / √(2 p (1 − p))
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)


def test_t_quantile_tends_to_the_normal_and_is_symmetric():
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)
    assert t_quantile(0.025, 4) == pytest.approx(-t_quantile(0.975, 4), rel=1e-12)
    assert t_quantile(0.5, 3) == 0.0
    for df in (1, 3, 7.5, 30):
        q = t_quantile(0.9, df)
        assert student_t_cdf(q, df) == pytest.approx(0.9, abs=1e-12)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_t_cdf_matches_a_monte_carlo_estimate():
    rng = random.Random(0)
    df, n, t = 5, 50_000, 1.3
    below = 0
    for _ in range(n):  # T = Z / √(χ²_df / df)
        z = rng.gauss(0, 1)
        chi2 = sum(rng.gauss(0, 1) ** 2 for _ in range(df))
        below += z / math.sqrt(chi2 / df) <= t
    assert student_t_cdf(t, df) == pytest.approx(below / n, abs=8e-3)  # ≈ 5 standard errors


# ---------------------------------------------------------------------------------------------
# Intervals


def test_mean_interval_by_hand():
    # mean 2, s = 1, n = 3: half-width = t_{0.975,2} · 1/√3 = 4.3027 / 1.7321 = 2.4841
    iv = mean_interval([1.0, 2.0, 3.0])
    assert iv.mean == 2.0 and iv.n == 3
    assert iv.low == pytest.approx(2.0 - 2.48414, abs=1e-4)
    assert iv.high == pytest.approx(2.0 + 2.48414, abs=1e-4)


def test_mean_interval_one_and_no_values():
    one = mean_interval([0.7])
    assert one.mean == 0.7 and one.n == 1 and math.isnan(one.low) and math.isnan(one.high)
    none = mean_interval([])
    assert none.n == 0 and math.isnan(none.mean)


def test_paired_difference_by_hand():
    base = {0: 1.0, 1: 2.0, 2: 3.0, 7: 10.0}  # seed 7 has no partner: left out
    arm = {0: 2.0, 1: 2.5, 2: 4.5, 5: 0.0}  # seed 5 neither
    # per-seed differences 1.0, 0.5, 1.5 → mean 1.0, s = 0.5, half = 4.3027 · 0.5/√3 = 1.24207
    d = paired_difference(arm, base)
    assert d.n == 3 and d.mean == pytest.approx(1.0)
    assert (d.low, d.high) == pytest.approx((1.0 - 1.24207, 1.0 + 1.24207), abs=1e-4)
    # unpaired, the same arms' intervals overlap widely; pairing removes the shared seed effect
    assert mean_interval([2.0, 2.5, 4.5]).low < mean_interval([1.0, 2.0, 3.0]).high


# ---------------------------------------------------------------------------------------------
# A sweep directory written by hand

GOLD = {"A": [1.0, 2.0, 3.0], "B": [2.0, 2.5, 4.5]}
KL = {"A": [0.1, 0.2, 0.3], "B": [0.4, 0.5, 0.9]}


def make_sweep(root, failed_b3=True):
    """Arms A (kl.estimator=k1) and B (k3), seeds 0-2 completed; B seed 3 failed."""
    arms = [
        {"name": "kl.estimator=k1", "values": {"kl.estimator": "k1"}},
        {"name": "kl.estimator=k3", "values": {"kl.estimator": "k3"}},
    ]
    runs = []
    for label, arm in zip("AB", arms):
        for seed in range(3):
            name = f"{arm['name']}__seed{seed}"
            d = root / "runs" / name
            (d / "rl").mkdir(parents=True)
            summary = {
                "run/status": "completed",
                "eval/gold_score": GOLD[label][seed],
                "eval/rm_score": 2 * GOLD[label][seed],
                "eval/kl_to_sft": KL[label][seed],
            }
            (d / "summary.json").write_text(json.dumps(summary))
            rows = ["iteration,step,reward/raw,kl/value,eval/gold_score,eval/kl_to_sft"]
            rows += [
                f"{i},{i},{seed + i},{0.1 * i},{GOLD[label][seed] * i / 2},{KL[label][seed] * i / 2}"
                for i in range(3)
            ]
            rows.append(",9,,,,")  # a row without an iteration (e.g. an epoch-level log)
            (d / "rl" / "metrics.csv").write_text("\n".join(rows) + "\n")
            runs.append(
                {"name": name, "arm": arm["name"], "seed": seed, "dir": f"runs/{name}", "status": "completed"}
            )
    if failed_b3:
        name = "kl.estimator=k3__seed3"
        (root / "runs" / name).mkdir(parents=True)
        runs.append(
            {
                "name": name,
                "arm": "kl.estimator=k3",
                "seed": 3,
                "dir": f"runs/{name}",
                "status": "failed",
                "error": "rl stage failed: RuntimeError: boom | bang",
            }
        )
    meta = {
        "recipe": "ppo",
        "overrides": ["rl.iterations=3"],
        "smoke": True,
        "seeds": [0, 1, 2, 3],
        "baseline": "kl.estimator=k1",
        "metrics": ["eval/gold_score", "eval/kl_to_sft", "eval/pretrain_loss"],
        "arms": arms,
        "runs": runs,
        "command": "instructrl sweep ppo --grid kl.estimator=k1,k3",
    }
    (root / "sweep.json").write_text(json.dumps(meta))
    return root


def read_csv(path):
    with open(path, newline="") as f:
        return {row["arm"]: row for row in csv.DictReader(f)}


def test_report_rows_counts_intervals_and_paired_differences(tmp_path):
    result = report.write_report(make_sweep(tmp_path))
    assert result["metrics"] == ["eval/gold_score", "eval/kl_to_sft"]
    assert result["missing"] == ["eval/pretrain_loss"]  # no run has it: listed, not reported
    rows = read_csv(tmp_path / "report.csv")
    a, b = rows["kl.estimator=k1"], rows["kl.estimator=k3"]
    assert (a["baseline"], a["finished"], a["failed"], a["seeds"]) == ("1", "3", "0", "3")
    assert (b["baseline"], b["finished"], b["failed"], b["seeds"]) == ("0", "3", "1", "4")
    assert b["kl.estimator"] == "k3"
    assert float(a["eval/gold_score:mean"]) == pytest.approx(2.0)
    assert float(a["eval/gold_score:ci_low"]) == pytest.approx(2.0 - 2.48414, abs=1e-4)
    assert float(b["eval/gold_score:mean"]) == pytest.approx(3.0)
    assert float(b["eval/gold_score:diff"]) == pytest.approx(1.0)
    assert float(b["eval/gold_score:diff_ci_high"]) == pytest.approx(1.0 + 1.24207, abs=1e-4)
    assert b["eval/gold_score:diff_n"] == "3"
    assert float(a["eval/gold_score:diff"]) == 0.0  # the baseline against itself

    md = (tmp_path / "report.md").read_text()
    assert "| `kl.estimator=k1` (baseline) | 3/3 | 0 | 2 [-0.4841, 4.484] |" in md
    assert "| `kl.estimator=k3` | +1 [-0.2421, 2.242] |" in md
    assert (
        "## Failed runs" in md
        and "`kl.estimator=k3__seed3` | rl stage failed: RuntimeError: boom / bang" in md
    )
    assert "Not reported (no finished run has them): `eval/pretrain_loss`" in md
    assert "instructrl sweep ppo --grid kl.estimator=k1,k3" in md


def test_report_plots_learning_curves_and_the_frontier(tmp_path):
    result = report.write_report(make_sweep(tmp_path), curves=["reward/raw", "eval/gold_score", "not/logged"])
    names = sorted(p.name for p in result["plots"])
    assert names == ["curve_eval_gold_score.png", "curve_reward_raw.png", "frontier.png"]
    for p in result["plots"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    md = (tmp_path / "report.md").read_text()
    assert "![frontier](plots/frontier.png)" in md


def test_curves_are_read_per_iteration_and_averaged_over_seeds(tmp_path):
    make_sweep(tmp_path)
    curve = report.read_curve(tmp_path / "runs" / "kl.estimator=k1__seed2" / "rl" / "metrics.csv")
    assert curve["reward/raw"] == {0: 2.0, 1: 3.0, 2: 4.0}
    data = report.load_sweep(tmp_path)
    per_arm = report.run_curves(data)
    agg = report.aggregate_curve([c["reward/raw"] for c in per_arm["kl.estimator=k1"]])
    # iteration 1: seeds 0, 1, 2 logged 1, 2, 3 → the same interval as by hand above
    it, iv = agg[1]
    assert it == 1 and iv.mean == 2.0 and iv.low == pytest.approx(2.0 - 2.48414, abs=1e-4)


def test_baseline_can_be_chosen_by_values_or_name(tmp_path):
    make_sweep(tmp_path)
    result = report.write_report(tmp_path, baseline="kl.estimator=k3")
    assert result["baseline"] == "kl.estimator=k3"
    rows = read_csv(tmp_path / "report.csv")
    assert float(rows["kl.estimator=k1"]["eval/gold_score:diff"]) == pytest.approx(-1.0)
    assert report.write_report(tmp_path, baseline="kl.estimator=k1")["baseline"] == "kl.estimator=k1"


def test_report_command(tmp_path, capsys):
    make_sweep(tmp_path)
    code = main(["report", str(tmp_path), "--metric", "eval/kl_to_sft", "--baseline", "kl.estimator=k3"])
    out, _ = capsys.readouterr()
    assert code == 0, out
    assert "kl.estimator=k1" in out and "report.md" in out
    rows = read_csv(tmp_path / "report.csv")
    assert (
        "eval/kl_to_sft:mean" in rows["kl.estimator=k1"]
        and "eval/gold_score:mean" not in rows["kl.estimator=k1"]
    )
    # KL differences k1 − k3 per seed: −0.3, −0.3, −0.6 → mean −0.4
    assert float(rows["kl.estimator=k1"]["eval/kl_to_sft:diff"]) == pytest.approx(-0.4)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (
            ["--baseline", "kl.estimator=k2"],
            ["--baseline 'kl.estimator=k2' matches no arm", "kl.estimator=k1"],
        ),
        (["--baseline", "kl.coef=1"], ["'kl.coef' is not a sweep axis", "kl.estimator"]),
        (["--baseline", "k1"], ["expected an arm name or KEY=VALUE"]),
    ],
)
def test_report_bad_baseline_is_one_line_exit_2(tmp_path, capsys, args, fragments):
    make_sweep(tmp_path)
    code = main(["report", str(tmp_path), *args])
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err


def test_report_on_a_directory_that_is_not_a_sweep(tmp_path, capsys):
    code = main(["report", str(tmp_path)])
    _, err = capsys.readouterr()
    assert code == 2 and "not a sweep directory (no sweep.json" in err


def test_interval_formatting():
    assert report.fmt_interval(Interval(0.5, 0.25, 0.75, 3)) == "0.5 [0.25, 0.75]"
    assert report.fmt_interval(Interval(0.5, math.nan, math.nan, 1)) == "0.5 (n=1)"
    assert report.fmt_interval(Interval(0.01, -0.1, 0.12, 2), signed=True) == "+0.01 [-0.1, 0.12]"
    assert report.fmt_interval(Interval(math.nan, math.nan, math.nan, 0)) == "—"
