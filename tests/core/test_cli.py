"""The launcher in-process: exit codes, one-line errors without tracebacks, listings, dry runs."""

from __future__ import annotations

import json

import pytest
from instructrl.core.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_bad_input(code, err, *fragments):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err  # one line, no traceback
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["run", "nonexistent_recipe", "--dry-run"], ["recipe 'nonexistent_recipe' not found", "bundled:"]),
        (["run", "ppo", "--dry-run", "kl.coeff=0.1"], ["kl.coeff", "did you mean 'coef'"]),
        (["run", "ppo", "--dry-run", "rl.lr=fast"], ["rl.lr", "could not be converted to Float"]),
        (["run", "ppo", "--dry-run", "rollout.temperature=-1"], ["rollout.temperature must be > 0"]),
        (
            ["run", "ppo", "--dry-run", "objective.name=ppo_clipped"],
            ["objective.name: unknown objective 'ppo_clipped'"],
        ),
        (
            ["run", "ppo", "--dry-run", "policy.model=/nonexistent/sft"],
            ["policy.model: model dir not found: /nonexistent/sft"],
        ),
        (["run", "ppo", "--dry-run", "kl.controller=adaptive", "kl.target=0"], ["kl.target must be > 0"]),
        (
            ["run", "ppo", "--resume", "--overwrite", "--run-dir", "x"],
            ["--resume and --overwrite cannot be combined"],
        ),
        (["run", "ppo", "--resume"], ["--resume needs --run-dir"]),
        (["run", "ppo", "--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
        (["plugins", "kl.coef=1"], ["unexpected key=value"]),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, args, fragments):
    code, _, err = run_cli(capsys, *args)
    assert_bad_input(code, err, *fragments)


def test_malformed_yaml_names_file_and_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: ppo\nkl: {coef: 0.1\n")
    code, _, err = run_cli(capsys, "run", str(bad), "--dry-run")
    assert_bad_input(code, err, "bad.yaml:", "malformed YAML")


def test_debug_shows_the_traceback(capsys):
    code, _, err = run_cli(capsys, "run", "ppo", "--dry-run", "kl.coeff=0.1", "--debug")
    assert code == 2
    assert "Traceback" in err


def test_plugins_json_lists_every_kind_with_package(capsys):
    from instructrl.core.registry import KINDS

    code, out, _ = run_cli(capsys, "plugins", "--json")
    assert code == 0
    listing = json.loads(out)
    rows = listing["components"]
    assert listing["broken"] == []
    assert {r["kind"] for r in rows} == set(KINDS)
    assert all(set(r) == {"kind", "name", "package", "plugin", "description"} for r in rows)
    assert {"kind": "extra_loss", "name": "ptx"}.items() <= next(
        r for r in rows if r["name"] == "ptx"
    ).items()


def test_plugins_table_groups_by_kind(capsys):
    code, out, _ = run_cli(capsys, "plugins")
    assert code == 0
    assert "kl_estimator (kl.estimator)" in out and "advantage (advantage.name)" in out


def test_recipes_lists_bundled_with_descriptions(capsys):
    from instructrl.core.config import bundled_recipes, bundled_sweeps

    code, out, _ = run_cli(capsys, "recipes", "--json")
    rows = json.loads(out)
    assert code == 0
    assert [r["name"] for r in rows] == [*bundled_recipes(), *bundled_sweeps()]
    assert {r["name"]: r["kind"] for r in rows}["instructgpt_claims"] == "sweep"
    assert "instructgpt_claims" not in bundled_recipes()
    assert all(r["description"] for r in rows)


def test_dry_run_writes_nothing_and_prints_batch_arithmetic(capsys, tmp_path):
    run_dir = tmp_path / "run"
    code, out, _ = run_cli(
        capsys,
        "run",
        "ppo",
        "--dry-run",
        "--json",
        "--run-dir",
        str(run_dir),
        "rollout.prompts_per_iteration=16",
        "rl.minibatches=4",
    )
    assert code == 0
    info = json.loads(out)
    assert not run_dir.exists()
    rl = info["derived"]["rl"]
    assert rl["minibatch"] == "16 / 4 = 4 sequences per process"
    assert rl["optimizer_steps_per_iteration"] == info["config"]["rl"]["epochs"] * 4
    assert rl["total_episodes"] == info["config"]["rl"]["iterations"] * 16
    stages = [s["stage"] for s in info["plan"]]
    assert stages == ["pretrain", "rl_init", "sft", "rm", "rl", "eval"]  # dependencies pulled in
    assert {p["key"]: p["status"] for p in info["paths"]}["policy.model"] in {"to be produced", "cached"}


def test_critic_free_estimator_says_the_value_block_is_ignored(capsys):
    code, out, _ = run_cli(capsys, "run", "ppo", "--dry-run", "--json", "advantage.name=grpo")
    info = json.loads(out)
    assert code == 0
    assert info["derived"]["rl"]["value_model"].startswith("none: 'grpo' is critic-free")
    assert info["derived"]["rl"]["samples_per_prompt"] == 4


def test_group_estimator_with_one_sample_is_rejected(capsys):
    code, _, err = run_cli(
        capsys, "run", "ppo", "--dry-run", "advantage.name=rloo", "rollout.samples_per_prompt=1"
    )
    assert_bad_input(code, err, "rollout.samples_per_prompt", "needs >= 2")


def test_non_empty_run_dir_needs_resume_or_overwrite(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "something").write_text("x")
    code, _, err = run_cli(capsys, "run", "ppo", "--smoke", "--run-dir", str(run_dir))
    assert_bad_input(code, err, "exists and is not empty", "--resume", "--overwrite")
    assert (run_dir / "something").read_text() == "x"  # lost nothing


def test_json_output_is_the_json_document_alone(capsys, smoke_pipeline, tmp_path):
    run_dir, _ = smoke_pipeline
    # a run: the stage lines go to stderr, stdout is the summary
    code, out, err = run_cli(
        capsys, "run", "ppo", "--smoke", "--json", "--run-dir", str(tmp_path / "run"), "rl.iterations=1", "eval.every=0"
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["run/status"] == "completed"
    assert "[rl] running" in err
    # the eval command at full sizes (progress bars on unless --json turns them off)
    code, out, err = run_cli(
        capsys, "eval", str(run_dir / "rl" / "model"), "--against", str(run_dir / "sft" / "model"),
        "--recipe", "ppo", "--out", str(tmp_path / "eval"), "--json", "eval.n_prompts=8", "eval.pretrain_docs=4",
        "eval.greedy=false",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["eval/n_prompts"] == 8


def test_the_result_table_shows_the_claims_of_one_seed(tmp_path):
    from instructrl.core.cli import format_summary

    summary = {
        "eval/win_rate_vs_sft": 0.61, "eval/gold_content": 0.5, "eval/gold_content_sft": 0.4,
        "eval/rl_start/gold_score": 0.3, "eval/rl_start/pretrain_loss": 1.1, "eval/pretrain_loss": 1.3,
        "eval/pretrain_loss_sft": 6.1, "rm/accuracy": 0.72, "rm/accuracy/same_format": 0.55,
    }  # fmt: skip
    lines = format_summary(summary, tmp_path).splitlines()
    table = {line.rsplit("  ", 1)[0].strip(): line.rsplit("  ", 1)[1] for line in lines[2:] if "  " in line}
    assert table["gold content: RL"] == "0.5000" and table["gold content: SFT"] == "0.4000"
    assert table["gold score: RL init"] == "0.3000" and table["pretrain-text loss: RL init"] == "1.1000"
    assert table["rm/accuracy/same_format"] == "0.5500" and table["win rate vs SFT (T=1, ties ½)"] == "0.6100"
