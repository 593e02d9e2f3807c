"""End-to-end smoke runs of the pipeline through the Python API (the launcher's own path)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from instructrl.core.errors import RunFailure
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

REQUIRED_SUMMARY_KEYS = [
    "eval/win_rate_vs_sft",
    "eval/win_rate_vs_sft_greedy",
    "eval/strict_win",
    "eval/strict_loss",
    "eval/n_prompts",
    "eval/gold_score",
    "eval/gold_score_sft",
    "eval/rm_score",
    "eval/kl_to_sft",
    "eval/pretrain_loss",
    "eval/pretrain_loss_sft",
    "eval/pretrain_loss_base",
    "rm/accuracy",
    "rm/labeler_ceiling",
    "time/total_s",
]


def test_pipeline_summary_has_every_documented_key(smoke_pipeline):
    run_dir, summary = smoke_pipeline
    missing = [k for k in REQUIRED_SUMMARY_KEYS if k not in summary]
    assert not missing, missing
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["run/status"] == "completed"
    assert on_disk["eval/win_rate_vs_sft"] == summary["eval/win_rate_vs_sft"]
    # win = strict wins + half the ties
    ties = 1 - summary["eval/strict_win"] - summary["eval/strict_loss"]
    assert summary["eval/win_rate_vs_sft"] == pytest.approx(summary["eval/strict_win"] + 0.5 * ties, abs=1e-6)
    assert 0 <= summary["rm/accuracy"] <= 1 and 0 < summary["rm/labeler_ceiling"] <= 1


def test_run_dir_tells_the_whole_story(smoke_pipeline):
    run_dir, _ = smoke_pipeline
    config = (run_dir / "config.yaml").read_text()
    for fragment in ("provenance:", "torch:", "transformers:", "lightning:", "seed: 0", "instructrl:"):
        assert fragment in config
    for stage in ("pretrain", "sft", "rm", "rl", "eval"):
        assert (run_dir / stage).is_dir(), stage
        assert (run_dir / stage / "summary.json").is_file(), stage
    for stage in ("pretrain", "sft", "rm", "rl"):
        rows = list(csv.DictReader(open(run_dir / stage / "metrics.csv")))
        assert rows, f"{stage}/metrics.csv is empty"
    assert (run_dir / "rl" / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "eval" / "samples" / "eval.jsonl").is_file()


def test_rl_metrics_have_the_documented_names(smoke_pipeline):
    run_dir, _ = smoke_pipeline
    rows = list(csv.DictReader(open(run_dir / "rl" / "metrics.csv")))
    columns = set(rows[0])
    for name in (
        "reward/raw", "reward/shaped", "kl/value", "kl/coef", "policy/entropy", "policy/clip_frac", "policy/approx_kl",
        "value/loss", "value/explained_variance", "advantage/mean", "advantage/std", "response/length", "response/eos_rate",
        "ptx/loss", "time/rollout_s", "time/score_s", "time/reference_s", "time/train_s", "invariant/ratio_dev",
    ):  # fmt: skip
        assert name in columns, name


def test_every_stage_saves_an_hf_dir_that_auto_classes_load(smoke_pipeline):
    run_dir, _ = smoke_pipeline
    for stage in ("pretrain", "sft", "rl"):
        model = AutoModelForCausalLM.from_pretrained(run_dir / stage / "model")
        assert model.config.vocab_size > 0
    rm = AutoModelForSequenceClassification.from_pretrained(run_dir / "rm" / "model")
    assert rm.config.num_labels == 1
    stats = json.loads((run_dir / "rm" / "model" / "reward_stats.json").read_text())
    assert set(stats) == {"demo_mean", "demo_std"}


def test_ratio_invariant_holds_on_every_iteration(smoke_pipeline):
    run_dir, _ = smoke_pipeline
    rows = [r for r in csv.DictReader(open(run_dir / "rl" / "metrics.csv")) if r.get("invariant/ratio_dev")]
    assert rows
    for r in rows:
        assert float(r["invariant/ratio_dev"]) <= 1e-4
        assert float(r["invariant/approx_kl"]) <= 1e-6


def test_second_run_reuses_cached_upstream_stages(smoke_pipeline, run_smoke, tmp_path):
    run_dir, _ = smoke_pipeline
    summary = run_smoke(tmp_path / "again", "ppo", ["kl.coef=0.05"])
    for stage in ("pretrain", "sft", "rm"):
        assert (tmp_path / "again" / stage).resolve() == (run_dir / stage).resolve(), stage
    assert summary["rm/accuracy"] == json.loads((run_dir / "summary.json").read_text())["rm/accuracy"]


def test_same_seed_reproduces_the_same_metrics(smoke_pipeline, run_smoke, tmp_path):
    a = run_smoke(tmp_path / "a", "ppo", ["seed=3"])
    b = run_smoke(tmp_path / "b", "ppo", ["seed=3"])
    keys = [k for k in a if k.startswith(("rl/", "eval/")) and isinstance(a[k], float)]
    assert keys
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    c = run_smoke(tmp_path / "c", "ppo", ["seed=4"])
    assert any(a[k] != c[k] for k in keys)


def test_broken_temperature_handling_trips_the_ratio_invariant(
    smoke_pipeline, run_smoke, tmp_path, monkeypatch
):
    from instructrl.plugins import hf

    original = hf.HFPolicy.forward

    def forward_ignoring_temperature(self, batch, *, temperature, return_logits=False):
        # a classic bug: logprobs at T=1 in training while rollouts were sampled (and scored) at T=0.7
        if torch.is_grad_enabled():
            temperature = 1.0
        return original(self, batch, temperature=temperature, return_logits=return_logits)

    monkeypatch.setattr(hf.HFPolicy, "forward", forward_ignoring_temperature)
    with pytest.raises(RunFailure, match=r"ratio invariant violated on the first minibatch of iteration 0"):
        run_smoke(tmp_path / "broken", "ppo", ["rollout.temperature=0.7"])
    status = json.loads((tmp_path / "broken" / "summary.json").read_text())
    assert status["run/status"] == "failed" and "ratio invariant" in status["run/error"]


def test_eval_reports_kl_zero_for_the_sft_policy_against_itself(smoke_pipeline, tmp_path):
    from instructrl.core.config import load_recipe
    from instructrl.core.training import StageContext
    from instructrl.plugins.stages.evaluate import run_evaluation

    run_dir, _ = smoke_pipeline
    sft = str((run_dir / "sft" / "model").resolve())
    recipe = load_recipe("ppo", ["reward.name=gold"], smoke=True)
    ctx = StageContext(recipe, "eval", tmp_path, {})
    summary = run_evaluation(ctx, sft, sft, None, None)
    assert summary["eval/kl_to_sft"] == pytest.approx(0.0, abs=1e-5)
    assert summary["eval/pretrain_loss"] == pytest.approx(summary["eval/pretrain_loss_sft"], abs=1e-6)
    # identical greedy policies tie on every prompt
    assert summary["eval/win_rate_vs_sft_greedy"] == 0.5 and summary["eval/strict_win_greedy"] == 0.0


def test_state_is_torch_float32(smoke_pipeline):
    run_dir, _ = smoke_pipeline
    model = AutoModelForCausalLM.from_pretrained(run_dir / "rl" / "model")
    assert next(model.parameters()).dtype == torch.float32


def test_resume_continues_a_killed_run_from_its_checkpoint_and_matches_an_uninterrupted_one(
    smoke_pipeline, run_smoke, tmp_path, monkeypatch
):
    from instructrl.plugins.stages import rl

    overrides = ["seed=5", "rl.iterations=4", "rl.checkpoint_every=2", "eval.every=0"]
    straight = run_smoke(tmp_path / "straight", "ppo", overrides)

    original = rl.rl_step.experience
    calls = []

    def dies_at_iteration_3(c, s, prompts, iteration, rank, timer):
        calls.append(iteration)
        if iteration == 3:
            raise RuntimeError("simulated kill")
        return original(c, s, prompts, iteration, rank, timer)

    monkeypatch.setattr(rl.rl_step, "experience", dies_at_iteration_3)
    with pytest.raises(RunFailure, match="simulated kill"):
        run_smoke(tmp_path / "killed", "ppo", overrides)
    assert calls == [0, 1, 2, 3]
    assert (tmp_path / "killed" / "rl" / "checkpoints" / "last.ckpt").is_file()

    def records(c, s, prompts, iteration, rank, timer):
        calls.append(iteration)
        return original(c, s, prompts, iteration, rank, timer)

    monkeypatch.setattr(rl.rl_step, "experience", records)
    calls.clear()
    resumed = run_smoke(tmp_path / "killed", "ppo", overrides, resume=True)
    # from the checkpoint after iteration 1 (checkpoint_every=2), not from scratch
    assert calls == [2, 3]
    assert resumed["run/status"] == "completed"
    # exactly the uninterrupted run: summary, every metrics row (but wall-clock columns), weights
    timeless = {k: v for k, v in straight.items() if not k.startswith("time/")}
    assert {k: v for k, v in resumed.items() if not k.startswith("time/")} == timeless
    for stage in ("rl", "eval"):
        a, b = (
            list(csv.DictReader(open(d / stage / "metrics.csv")))
            for d in (tmp_path / "straight", tmp_path / "killed")
        )
        assert [{k: v for k, v in r.items() if not k.startswith("time/")} for r in a] == [
            {k: v for k, v in r.items() if not k.startswith("time/")} for r in b
        ], stage
    weights = [
        (d / "rl" / "model" / "model.safetensors").read_bytes()
        for d in (tmp_path / "straight", tmp_path / "killed")
    ]
    assert weights[0] == weights[1]
