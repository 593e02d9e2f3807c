"""The claims report: Gao et al.'s fit and the interpolation against closed forms, and every target
of a hand-made claims sweep worked out by hand."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
from instructrl.core.cli import main
from instructrl.plugins.commands import claims, report


def test_fit_gao_recovers_the_coefficients_of_its_own_form():
    d = [0.0, 0.5, 1.0, 2.0, 3.0, 4.5]
    r = [claims.gao(x, 0.7, 0.25) for x in d]
    alpha, beta = claims.fit_gao(d, r)
    assert alpha == pytest.approx(0.7, abs=1e-12) and beta == pytest.approx(0.25, abs=1e-12)
    # the peak of d(α − β log d) is at d* = exp(α/β − 1)
    assert max(d, key=lambda x: claims.gao(x, 1.0, 1.0)) == 1.0  # d* = e⁰ = 1


def test_fit_gao_needs_two_distinct_points():
    with pytest.raises(ValueError, match="two points"):
        claims.fit_gao([0.0, 2.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="two points"):
        claims.fit_gao([2.0, 2.0], [1.0, 1.1])


def test_interpolate_at_the_first_crossing():
    xs, ys = [0.5, 0.6, 0.8, 0.7], [1.0, 1.2, 2.0, 3.0]
    assert claims.interpolate_at(xs, ys, 0.55) == pytest.approx(1.1)
    assert claims.interpolate_at(xs, ys, 0.75) == pytest.approx(1.8)  # the rising segment comes first
    assert claims.interpolate_at(xs, ys, 0.9) is None and claims.interpolate_at(xs, ys, 0.4) is None


ARMS = {
    "ppo_ptx": "kl.coef=0.02,ptx.coef=27.8",
    "ppo": "kl.coef=0.02,ptx.coef=0",
    "beta2": "kl.coef=2.0,ptx.coef=0",
}


def _summary(part: str, seed: int) -> dict:
    s = {
        "run/status": "completed",
        "eval/gold_content_sft": 0.40 + 0.01 * seed,
        "eval/gold_score_sft": 0.30,
        "eval/pretrain_loss_sft": 2.0,
        "eval/pretrain_loss_base": 1.0,
        "eval/rl_start/gold_score": 0.27 + 0.01 * seed,
        "eval/rl_start/rm_score": 0.0,
        "eval/rl_start/win_rate_vs_sft": 0.5,
        "eval/rl_start/pretrain_loss": 1.2,
        "eval/rl_start/kl_to_sft": 1.0,
        "rm/accuracy": 0.75 + 0.01 * seed,
        "rm/accuracy/same_format": 0.66,
        "rm/labeler_ceiling": 0.80,
    }
    s |= {
        "ppo_ptx": {"eval/win_rate_vs_sft": 0.70 + 0.01 * seed, "eval/strict_win": 0.5, "eval/strict_loss": 0.2,
                    "eval/gold_content": 0.50 + 0.01 * seed, "eval/pretrain_loss": 2.4},
        "ppo": {"eval/win_rate_vs_sft": 0.72 + 0.01 * seed, "eval/strict_win": 0.5, "eval/strict_loss": 0.3,
                "eval/gold_content": 0.45, "eval/pretrain_loss": 3.0 + 0.1 * seed},
        "beta2": {"eval/win_rate_vs_sft": 0.6, "eval/pretrain_loss": 2.5 + 0.1 * seed},
    }[part]  # fmt: skip
    return s


def _curve(part: str, seed: int) -> list[dict]:
    if part != "ppo":
        return []
    # KL 1, 4, 9 (d = 1, 2, 3); gold rises then falls; win rate 0.55 → 0.65 → 0.72
    return [
        {"iteration": 9, "eval/kl_to_ref": 1.0, "eval/gold_score": 0.37 + 0.01 * seed, "eval/rm_score": 0.5,
         "eval/win_rate_vs_sft": 0.55, "eval/pretrain_loss": 2.2},
        {"iteration": 19, "eval/kl_to_ref": 4.0, "eval/gold_score": 0.42 + 0.01 * seed, "eval/rm_score": 1.0,
         "eval/win_rate_vs_sft": 0.65, "eval/pretrain_loss": 2.6},
        {"iteration": 29, "eval/kl_to_ref": 9.0, "eval/gold_score": 0.32 + 0.01 * seed, "eval/rm_score": 1.4,
         "eval/win_rate_vs_sft": 0.72, "eval/pretrain_loss": 3.0},
    ]  # fmt: skip


@pytest.fixture
def claims_sweep(tmp_path: Path) -> Path:
    runs = []
    for part, arm in ARMS.items():
        for seed in (0, 1, 2):
            d = tmp_path / "runs" / f"{arm}__seed{seed}"
            (d / "rl").mkdir(parents=True)
            (d / "summary.json").write_text(json.dumps(_summary(part, seed)))
            rows = _curve(part, seed)
            with open(d / "rl" / "metrics.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["iteration", *claims.CURVE_KEYS])
                w.writeheader()
                w.writerows(rows)
            runs.append(
                {"name": d.name, "arm": arm, "seed": seed, "dir": f"runs/{d.name}", "status": "completed"}
            )
    meta = {
        "recipe": "instructgpt",
        "seeds": [0, 1, 2],
        "arms": [{"name": a, "values": dict(kv.split("=") for kv in a.split(","))} for a in ARMS.values()],
        "baseline": ARMS["ppo"],
        "metrics": ["eval/win_rate_vs_sft"],
        "comparisons": {
            "ppo_ptx_vs_sft": {"arm": ARMS["ppo_ptx"], "against": "sft"},
            "ppo_vs_sft": {"arm": ARMS["ppo"], "against": "sft"},
            "ppo_ptx_vs_ppo": {"arm": ARMS["ppo_ptx"], "against": ARMS["ppo"]},
            "beta2_vs_ppo": {"arm": ARMS["beta2"], "against": ARMS["ppo"]},
        },
        "wall_s": 1800.0,
        "runs": runs,
    }
    (tmp_path / "sweep.json").write_text(json.dumps(meta))
    return tmp_path


def test_every_target_worked_out_by_hand(claims_sweep):
    table, figures = claims.checks(report.load_sweep(claims_sweep))
    by = {c.quantity.split(" (")[0]: c for c in table}
    win = by["PPO-ptx win rate vs SFT"]  # 0.70, 0.71, 0.72: mean 0.71, t(0.975, 2)·0.01/√3 = 0.0248
    assert win.value == "0.71 [0.6852, 0.7348]" and win.ok is True
    assert by["PPO-ptx strict wins / strict losses"].ok is True  # 0.5 ≥ 2 × 0.2
    content = by["gold content: PPO-ptx − SFT"]  # 0.10 every seed: a zero-width interval above 0
    assert content.value.startswith("+0.1 [") and content.ok is True
    assert by["pretraining loss: PPO − SFT"].ok is True  # rises 1.0, 1.1, 1.2
    # recovered: (3.0 − 2.4)/(3.0 − 2.0) = 0.6, (3.1 − 2.4)/1.1 = 0.636, (3.2 − 2.4)/1.2 = 0.667
    rec = by["share of the rise PPO-ptx recovers"]
    assert rec.value.startswith(report.fmt((0.6 + 0.7 / 1.1 + 0.8 / 1.2) / 3)) and rec.ok is True
    assert by["win rate: PPO-ptx − PPO"].ok is True  # −0.02 every seed ≥ −0.03
    # (c): β = 2 ends at win 0.6; the PPO curve (start 0.5 → 0.55 → 0.65) has loss 2.4 there
    # (halfway between 2.2 and 2.6); β = 2's loss 2.5, 2.6, 2.7 → differences 0.1, 0.2, 0.3
    assert by["pretraining loss: β = 2 − PPO at β = 2's win rate"].value.startswith("+0.2 [")
    # (d): the mean gold curve 0.28 (start), 0.38, 0.43, 0.33 peaks at the third point: 4 points to past it
    peak = next(c for c in table if c.quantity.startswith("PPO gold curve: 4 points, √KL up to 3.00"))
    assert peak.value == "peak at point 3 (√KL 2.00); 4 points from KL 0 to past it" and peak.ok is False
    # the tax against the RL init (loss 1.2): PPO 3.0, 3.1, 3.2 → +1.9 on average; ptx recovers
    # (3.0 − 2.4)/1.8, (3.1 − 2.4)/1.9, (3.2 − 2.4)/2.0
    assert by["pretraining loss: PPO − its start, the RL init"].value.startswith("+1.9 [")
    share = (0.6 / 1.8 + 0.7 / 1.9 + 0.8 / 2.0) / 3
    assert by["share of that rise PPO-ptx recovers"].value.startswith(report.fmt(share))
    alpha, beta = figures["gao"]["eval/gold_score"]
    d, r = [1.0, 2.0, 3.0], [0.10, 0.15, 0.05]
    assert (alpha, beta) == pytest.approx(claims.fit_gao(d, r))
    assert beta > 0  # a turning-down curve
    # (e), (f)
    assert by["RM accuracy vs gold"].ok is True and "ceiling 0.8)" in by["RM accuracy vs gold"].quantity
    assert by["RM accuracy on same-format pairs"].ok is True
    assert (
        by["RL init pretraining loss ÷ base model's"].value.startswith("1.2 [")
        and by["RL init pretraining loss ÷ base model's"].ok
    )
    gold = by["RL init gold score ÷ SFT's"]  # 0.27/0.30, 0.28/0.30, 0.29/0.30: mean 0.933 < 0.95
    assert gold.value.startswith("0.9333") and gold.ok is False


def test_the_command_writes_the_results_with_header_and_plot(claims_sweep, capsys):
    out = claims_sweep / "docs" / "results.md"
    assert main(["claims", str(claims_sweep), "--out", str(out)]) == 0
    text = out.read_text()
    assert "wall time of the sweep: 30.0 min" in text and "seeds 0, 1, 2" in text
    assert "| (f) | RL init gold score ÷ SFT's | 0.9333" in text and "**missed**" in text
    assert (out.parent / "img" / "results_overoptimisation.png").is_file()
    links = re.findall(r"\]\(([^)]+\.png)\)", text)
    assert any("results_sweep_" in link for link in links)  # the sweep's plots, copied beside it
    assert all((out.parent / link).is_file() for link in links), links
    assert "## The sweep's report" in text and "ppo_ptx_vs_sft" in text  # the named comparisons
    assert "MISSED" in capsys.readouterr().out


def test_a_sweep_without_the_claims_comparisons_is_a_clear_error(claims_sweep, capsys):
    meta = json.loads((claims_sweep / "sweep.json").read_text())
    del meta["comparisons"]["ppo_vs_sft"]
    (claims_sweep / "sweep.json").write_text(json.dumps(meta))
    assert main(["claims", str(claims_sweep)]) == 2
    assert "no comparison 'ppo_vs_sft'" in capsys.readouterr().err


def test_without_the_beta2_arm_only_c_is_left_out(claims_sweep):
    meta = json.loads((claims_sweep / "sweep.json").read_text())
    del meta["comparisons"]["beta2_vs_ppo"]
    (claims_sweep / "sweep.json").write_text(json.dumps(meta))
    rows, _ = claims.checks(report.load_sweep(claims_sweep))
    (c,) = [r for r in rows if r.target == "(c)"]
    assert c.value == "no β = 2 arm in this sweep (no beta2_vs_ppo)" and c.ok is None
    assert {r.target for r in rows} == {"(a)", "(b)", "(c)", "(d)", "(e)", "(f)"}


def test_named_comparisons_against_sft_pair_each_run_with_its_own_sft(claims_sweep):
    data = report.load_sweep(claims_sweep)
    rows = {c.name: c for c in report.build_comparisons(data, ["eval/gold_content", "eval/win_rate_vs_sft"])}
    assert rows["ppo_ptx_vs_sft"].diffs["eval/gold_content"].mean == pytest.approx(0.10)
    assert rows["ppo_ptx_vs_sft"].diffs["eval/win_rate_vs_sft"].mean == pytest.approx(0.21)  # vs ½
    assert rows["ppo_ptx_vs_ppo"].diffs["eval/win_rate_vs_sft"].mean == pytest.approx(-0.02)
    assert math.isnan(rows["beta2_vs_ppo"].diffs["eval/gold_content"].mean)  # β = 2 has no content figure


def test_a_smoke_claims_sweep_runs_end_to_end_and_its_report_reads_the_runs(tmp_path, capsys):
    """The bundled claims sweep cut to 2 arms (PPO, PPO-ptx) × 1 seed under --smoke, then
    `instructrl claims` on it: every target row is written from the runs' own figures."""
    import yaml
    from instructrl.core.config import bundled_sweeps

    spec = yaml.safe_load(bundled_sweeps()["instructgpt_claims"].read_text())
    block = spec["sweep"]
    block["zip"] = {"kl.coef": [0.02, 0.02], "ptx.coef": [0, 27.8]}
    block["seeds"] = [0]
    del block["comparisons"]["beta2_vs_ppo"]
    spec["eval"]["at"] = [1]  # one in-run evaluation, so the PPO curve has a point past its start
    path = tmp_path / "claims_smoke.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--smoke", "--out", str(out), "--workers", "1"]) == 0, (
        capsys.readouterr().err
    )
    capsys.readouterr()

    runs = {r.arm: r for r in report.load_sweep(out).runs}
    assert set(runs) == {"kl.coef=0.02,ptx.coef=0", "kl.coef=0.02,ptx.coef=27.8"}
    ppo, ptx = runs["kl.coef=0.02,ptx.coef=0"].summary, runs["kl.coef=0.02,ptx.coef=27.8"].summary
    assert ppo["rm/accuracy"] == ptx["rm/accuracy"]  # one pipeline per seed: the arms share the RM

    results = tmp_path / "docs" / "results.md"
    assert main(["claims", str(out), "--out", str(results)]) == 0
    text = results.read_text()
    row = lambda target, quantity: next(  # noqa: E731
        line for line in text.splitlines() if line.startswith(f"| {target} | {quantity}")
    )
    one = lambda x, signed=False: report.fmt_interval(report.mean_interval([x]), signed=signed)  # noqa: E731
    assert one(ptx["eval/win_rate_vs_sft"]) in row("(a)", "PPO-ptx win rate vs SFT")
    content = ptx["eval/gold_content"] - ptx["eval/gold_content_sft"]
    assert one(content, signed=True) in row("(a)", "gold content: PPO-ptx − SFT")
    rise = ppo["eval/pretrain_loss"] - ppo["eval/pretrain_loss_sft"]
    assert one(rise, signed=True) in row("(b)", "pretraining loss: PPO − SFT")
    assert one(ppo["rm/accuracy"]) in row("(e)", "RM accuracy vs gold")
    init = ppo["eval/rl_start/gold_score"] / ppo["eval/gold_score_sft"]
    assert one(init) in row("(f)", "RL init gold score ÷ SFT's")
    assert "no β = 2 arm in this sweep" in row("(c)", "pretraining loss: β = 2")
    assert "seeds 0;" in text and "2/2 runs finished" in text
