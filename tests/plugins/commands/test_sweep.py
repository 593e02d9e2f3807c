"""Sweeps: planning and naming, validation before anything runs, parallel smoke sweeps that are
interrupted and resumed, a failing arm, the sweep-file form, and the Ray executor."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import textwrap
from pathlib import Path

import pytest
from instructrl.core.cli import main
from instructrl.plugins.commands import sweep
from instructrl.plugins.commands.report import mean_interval, paired_difference, t_quantile

FAST = ["rl.iterations=1", "eval.every=0", "eval.n_prompts=8", "eval.greedy=false"]


def sweep_main(*argv):
    """``main(["sweep", ...])`` in this process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["sweep", *argv])
    return code, out.getvalue(), err.getvalue()


def state(sweep_dir: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((sweep_dir / "sweep.json").read_text())["runs"]}


def attempts_in_log(sweep_dir: Path, name: str) -> int:
    return (sweep_dir / "logs" / f"{name}.log").read_text().count("=== ")


# ---------------------------------------------------------------------------------------------
# Planning (no runs)


def test_axis_values_are_typed_as_yaml_types_them():
    assert sweep.parse_axis("ptx.coef=0,27.8,1e-5").values == (0, 27.8, 1e-5)
    assert sweep.parse_axis("kl.estimator=k1,k3").values == ("k1", "k3")
    assert sweep.parse_axis("eval.greedy=true,false").values == (True, False)
    assert sweep.parse_axis("policy.model=@sft, null").values == ("@sft", None)
    for value in (
        0,
        27.8,
        1e-5,
        "k3",
        True,
        None,
        "@sft",
        "a b",
        "1.0",
        [1, "x"],
        {"name": "clip", "low": -1},
    ):
        from instructrl.plugins.commands.report import typed_value

        text = sweep.format_value(value)
        assert typed_value(text) == value or (value == "@sft" and json.loads(text) == value), (value, text)


def test_seeds():
    assert sweep.parse_seeds("3") == [0, 1, 2]
    assert sweep.parse_seeds("0,1,2") == [0, 1, 2]
    assert sweep.parse_seeds("7,") == [7]
    assert sweep.parse_seeds(2) == [0, 1]
    assert sweep.parse_seeds([4, 9]) == [4, 9]
    for bad in ("0", "x", "1,1", "-1,2"):
        with pytest.raises(sweep.SweepError):
            sweep.parse_seeds(bad)


def test_arms_are_the_grid_product_times_the_zipped_rows_with_readable_names():
    grid = [sweep.Axis("kl.estimator", ("k1", "k3")), sweep.Axis("ptx.coef", (0, 27.8))]
    zipped = [sweep.Axis("rl.lr", (1e-5, 3e-5)), sweep.Axis("rollout.temperature", (0.7, 1.0))]
    arms = sweep.make_arms(grid, zipped)
    assert len(arms) == 2 * 2 * 2
    assert arms[0].name == "kl.estimator=k1,ptx.coef=0,rl.lr=1e-05,rollout.temperature=0.7"
    assert arms[1].values == {"kl.estimator": "k1", "ptx.coef": 0, "rl.lr": 3e-5, "rollout.temperature": 1.0}
    assert arms[-1].overrides == [
        "kl.estimator=k3",
        "ptx.coef=27.8",
        "rl.lr=3e-05",
        "rollout.temperature=1.0",
    ]
    assert sweep.run_name(arms[0].name, 1).endswith("__seed1")
    assert sweep.make_arms([], [])[0].name == "base"
    # unsafe characters are replaced; names that collide after that get a hash suffix
    a, b = sweep.make_arms([sweep.Axis("task.name", ("a/b", "a:b"))], [])
    assert a.name.startswith("task.name=a_b") and b.name.startswith("task.name=a_b") and a.name != b.name
    long = sweep.make_arms(
        [sweep.Axis("reward_transforms", ([{"name": "clip", "low": -1, "high": 1}] * 9,))], []
    )
    assert len(long[0].name) <= sweep.MAX_NAME and "/" not in long[0].name


def test_every_run_gets_the_fixed_overrides_its_arm_and_its_seed():
    spec = sweep.SweepSpec(
        "ppo", ["rl.iterations=1"], [sweep.Axis("kl.estimator", ("k1", "k3"))], seeds=[0, 1]
    )
    plan = sweep.plan_sweep(spec, "out")
    assert [r.name for r in plan.runs] == [
        "kl.estimator=k1__seed0",
        "kl.estimator=k1__seed1",
        "kl.estimator=k3__seed0",
        "kl.estimator=k3__seed1",
    ]
    assert plan.runs[3].overrides[-3:] == ["rl.iterations=1", "kl.estimator=k3", "seed=1"]
    assert plan.baseline == "kl.estimator=k1"
    # the default directory depends on the base and the axis keys, so the same command resumes
    assert sweep.default_out(spec) == sweep.default_out(
        sweep.SweepSpec("ppo", ["rl.iterations=1"], spec.grid)
    )
    assert sweep.default_out(spec) != sweep.default_out(
        sweep.SweepSpec("ppo", ["rl.iterations=2"], spec.grid)
    )


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--grid", "kl.estimator=k1,nope"], ["arm 'kl.estimator=nope' (seed 0)", "kl.estimator", "'nope'"]),
        (["--grid", "rl.lr=0.001,fast"], ["arm 'rl.lr=fast'", "rl.lr"]),
        (["--grid", "kl.coef"], ["--grid 'kl.coef': expected KEY=V1,V2"]),
        (["--grid", "kl.coef=0.1,"], ["--grid kl.coef: empty value"]),
        (["--grid", "kl.coef=0.1", "--grid", "kl.coef=0.2"], ["kl.coef: swept twice"]),
        (["--zip", "kl.coef=0.1,0.2", "--zip", "rl.lr=1e-5"], ["zipped axes need the same number of values"]),
        (["--grid", "seed=1,2"], ["seed: not a sweep axis; use --seeds"]),
        (["kl.coef=0.1", "--grid", "kl.coef=0.1,0.2"], ["kl.coef: both a fixed override and a sweep axis"]),
        (
            ["--grid", "kl.coef=0.1,0.2", "--baseline", "kl.coef=0.3"],
            ["--baseline 'kl.coef=0.3' matches no arm"],
        ),
        (["--grid", "kl.coef=0.1,0.2", "--seeds", "0"], ["--seeds 0: the number of seeds must be >= 1"]),
        (["--grid", "kl.coef=0.1,0.2", "--workers", "0"], ["--workers: must be >= 1"]),
    ],
)
def test_a_bad_sweep_is_rejected_before_anything_runs(tmp_path, args, fragments):
    out = tmp_path / "sweep"
    code, stdout, err = sweep_main("ppo", "--smoke", "--out", str(out), *args)
    assert code == 2, (stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not out.exists()  # nothing written, nothing run


def test_dry_run_validates_every_run_and_writes_nothing(tmp_path):
    out = tmp_path / "sweep"
    code, stdout, err = sweep_main(
        "ppo", "--smoke", *FAST, "--grid", "kl.estimator=k1,k3", "--grid", "ptx.coef=0,27.8", "--seeds", "3",
        "--out", str(out), "--dry-run",
    )  # fmt: skip
    assert code == 0, err
    assert "4 arms × 3 seeds = 12 runs" in stdout
    assert "kl.estimator=k3,ptx.coef=27.8__seed2" in stdout and "to run" in stdout
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# The sweep file


SWEEP_FILE = """
extends: ppo
description: KL estimators with and without the pretraining mix
rl:
  iterations: 1
eval: {every: 0, n_prompts: 8, greedy: false}
sweep:
  smoke: true
  grid:
    kl:
      estimator: [k1, k3]
    reward_transforms: [[], [{name: clip, low: -1.0, high: 1.0}]]
  zip:
    rl.lr: [1.0e-5, 3.0e-5]
    rollout.temperature: [0.7, 1.0]
  seeds: [3, 5]
  baseline: {kl.estimator: k1, reward_transforms: [], rl.lr: 1.0e-5}
  metrics: [eval/gold_score]
"""


def test_sweep_file_form(tmp_path):
    path = tmp_path / "ablation.yaml"
    path.write_text(SWEEP_FILE)
    spec = sweep.read_sweep_file(path)
    assert spec.recipe == "ppo" and spec.smoke and spec.seeds == [3, 5]
    assert spec.overrides == ["rl.iterations=1", "eval.every=0", "eval.n_prompts=8", "eval.greedy=false"]
    assert [a.key for a in spec.grid] == ["kl.estimator", "reward_transforms"]
    assert spec.grid[1].values == ([], [{"name": "clip", "low": -1.0, "high": 1.0}])  # a value with commas
    assert spec.zipped[0].values == (1e-5, 3e-5)
    plan = sweep.plan_sweep(spec)
    assert plan.out == Path("sweeps") / "ablation"
    assert len(plan.arms) == 2 * 2 * 2 and len(plan.runs) == 16
    assert plan.baseline == "kl.estimator=k1,reward_transforms=empty,rl.lr=1e-05,rollout.temperature=0.7"
    clip = next(r for r in plan.runs if "clip" in r.name)
    assert (
        clip.name
        == "kl.estimator=k1,reward_transforms=name_clip+low_-1.0+high_1.0,rl.lr=1e-05,rollout.temperature=0.7__seed3"
    )
    assert "reward_transforms=[{name: clip, low: -1.0, high: 1.0}]" in clip.overrides

    out = tmp_path / "out"
    code, stdout, err = sweep_main(str(path), "--out", str(out), "--dry-run")
    assert code == 0, err
    assert "8 arms × 2 seeds = 16 runs" in stdout and "__seed5" in stdout
    # the command line adds to the file: an axis (the file's baseline no longer names one arm) …
    more = [str(path), "--grid", "ptx.coef=0,1", "--seeds", "1", "--out", str(out), "--dry-run"]
    code, _, err = sweep_main(*more)
    assert code == 2 and "--baseline 'kl.estimator=k1,reward_transforms=[],rl.lr=1e-05' matches 2 arms" in err
    # … and --seeds and --baseline replace the file's
    code, stdout, err = sweep_main(
        *more, "--baseline", "kl.estimator=k3,reward_transforms=[],rl.lr=3e-5,ptx.coef=1"
    )
    assert code == 0, err
    assert "16 arms × 1 seeds = 16 runs" in stdout
    assert "baseline: kl.estimator=k3,reward_transforms=empty,ptx.coef=1,rl.lr=3e-05" in stdout


def test_the_bundled_claims_sweep_seeds_every_stage_and_names_its_comparisons(tmp_path):
    assert sweep.is_sweep_file("instructgpt_claims") and not sweep.is_sweep_file("instructgpt")
    spec = sweep.read_sweep_file(sweep._sweep_path("instructgpt_claims"))
    plan = sweep.plan_sweep(spec)
    assert plan.out == Path("sweeps") / "instructgpt_claims"
    assert len(plan.arms) == 3 and plan.seeds == [0, 1, 2] and len(plan.runs) == 9
    for run in plan.runs:  # three independent pipelines: every stage's seed is the run's seed
        for key in ("seed", "pretrain.seed", "sft.seed", "rl_init.seed", "rm.seed"):
            assert f"{key}={run.seed}" in run.overrides, (run.name, key)
    assert 'precision="32"' in run.overrides  # pinned: no dependence on the host's default
    ptx = plan.comparisons["ppo_ptx_vs_sft"]
    assert ptx == {"arm": "kl.coef=0.02,ptx.coef=27.8", "against": "sft"}
    assert plan.comparisons["beta2_vs_ppo"] == {
        "arm": "kl.coef=2.0,ptx.coef=0",
        "against": "kl.coef=0.02,ptx.coef=0",
    }
    assert plan.meta()["comparisons"] == plan.comparisons and plan.meta()["seed_keys"][0] == "pretrain.seed"
    code, stdout, err = sweep_main("instructgpt_claims", "--smoke", "--out", str(tmp_path / "c"), "--dry-run")
    assert code == 0, err
    assert "3 arms × 3 seeds = 9 runs" in stdout and not (tmp_path / "c").exists()


def test_a_bundled_sweep_is_not_a_recipe(capsys):
    code = main(["run", "instructgpt_claims", "--dry-run"])
    err = capsys.readouterr().err
    assert (
        code == 2
        and "'instructgpt_claims' is a bundled sweep" in err
        and "instructrl sweep instructgpt_claims" in err
    )
    assert main(["recipes"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("instructgpt_claims"))
    assert "[sweep]" in line


@pytest.mark.parametrize(
    ("block", "fragment"),
    [
        ("seed_keys: [seed]", "sweep.seed_keys: seed is always the seed"),
        ("seed_keys: [kl.coef]", "sweep.seed_keys: kl.coef is also fixed or swept"),
        (
            "comparisons: {a: {arm: {kl.coef: 0.1}}}",
            "sweep.comparisons.a: expected exactly the keys arm and against",
        ),
        (
            "comparisons: {a: {arm: {kl.coef: 0.3}, against: sft}}",
            "sweep.comparisons.a.arm 'kl.coef=0.3' matches no arm",
        ),
        ("comparisons: {a: {arm: {kl.coef: 0.1}, against: {kl.cof: 1}}}", "'kl.cof' is not a sweep axis"),
    ],
)
def test_bad_seed_keys_and_comparisons(tmp_path, block, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(f"extends: ppo\nsweep:\n  grid: {{kl.coef: [0.1, 0.2]}}\n  {block}\n")
    code, _, err = sweep_main(str(path), "--smoke", "--out", str(tmp_path / "o"), "--dry-run")
    assert code == 2 and fragment in err, err


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("extends: ppo\nsweep: {grids: {kl.coef: [1]}}\n", "sweep.grids: unknown key; did you mean 'grid'?"),
        ("sweep: {grid: {kl.coef: [1, 2]}}\n", "needs 'extends: RECIPE'"),
        ("extends: ppo\nsweep: {grid: {kl.coef: 0.1}}\n", "sweep.grid.kl.coef: expected a non-empty list"),
        ("extends: nowhere\nsweep: {grid: {kl.coef: [1, 2]}}\n", "recipe 'nowhere' not found"),
        ("extends: ppo\nkl: {coeff: 1}\nsweep: {grid: {kl.estimator: [k1, k3]}}\n", "kl.coeff"),
    ],
)
def test_bad_sweep_files(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, _, err = sweep_main(str(path), "--out", str(tmp_path / "o"), "--dry-run")
    assert code == 2 and fragment in err, err


# ---------------------------------------------------------------------------------------------
# Running: 2 arms × 2 seeds on 2 workers, stopped after two runs, then resumed


@pytest.fixture(scope="module")
def resumed_sweep(smoke_pipeline, tmp_path_factory):
    """A --smoke sweep stopped (as by Ctrl-C) once two runs finished, then the same command again."""
    out = tmp_path_factory.mktemp("sweep") / "kl"
    argv = [
        "ppo",
        "--smoke",
        *FAST,
        "--grid",
        "kl.estimator=k1,k3",
        "--seeds",
        "2",
        "--workers",
        "2",
        "--out",
        str(out),
    ]
    finished = []
    original = sweep.Progress.finished

    def stop_after_two(self, result):
        original(self, result)
        finished.append(result.name)
        if len(finished) == 2:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep.Progress, "finished", stop_after_two)
        first = sweep_main(*argv)
    after_first = state(out)
    mtimes = {
        n: (out / r["dir"] / "summary.json").stat().st_mtime_ns
        for n, r in after_first.items()
        if r["status"] == "completed"
    }
    started = {
        n for n, r in after_first.items() if (out / r["dir"]).is_dir() and any((out / r["dir"]).iterdir())
    }
    second = sweep_main(*argv)
    return {
        "out": out,
        "first": first,
        "after_first": after_first,
        "mtimes": mtimes,
        "started": started,
        "second": second,
    }


def test_interrupted_sweep_records_what_finished(resumed_sweep):
    code, stdout, _ = resumed_sweep["first"]
    assert code == 130, stdout
    assert "re-run the same command to resume" in stdout
    statuses = sorted(r["status"] for r in resumed_sweep["after_first"].values())
    # two finished before the stop; a third only if it beat the interrupt
    assert 2 <= statuses.count("completed") <= 3, statuses
    assert set(statuses) <= {"completed", "interrupted", "pending"} and len(statuses) == 4
    assert statuses.count("completed") == len(resumed_sweep["mtimes"])


def test_rerun_completes_without_redoing_finished_runs(resumed_sweep):
    out = resumed_sweep["out"]
    code, stdout, err = resumed_sweep["second"]
    assert code == 0, (stdout, err)
    done = len(resumed_sweep["mtimes"])
    assert f"({done} already completed, 0 failed earlier)" in stdout
    assert f"{4 - done} to run: {min(2, 4 - done)} at a time" in stdout
    final = state(out)
    assert all(r["status"] == "completed" for r in final.values()), final
    for name, mtime in resumed_sweep["mtimes"].items():
        assert (out / final[name]["dir"] / "summary.json").stat().st_mtime_ns == mtime  # not redone
        assert attempts_in_log(out, name) == 1 and final[name]["attempts"] == 1
    for name, before in resumed_sweep["after_first"].items():
        if before["status"] == "interrupted":  # started, stopped, then run again
            assert final[name]["attempts"] == 2 and attempts_in_log(out, name) == 2
            headers = [
                ln for ln in (out / "logs" / f"{name}.log").read_text().splitlines() if ln.startswith("=== ")
            ]
            # a run dir with something in it is resumed in place; an empty one starts afresh
            assert ("--resume" in headers[-1]) == (name in resumed_sweep["started"]), headers
    threads = max(1, (os.cpu_count() or 1) // min(2, 4 - done))
    assert f"at a time, {threads} torch thread(s) each (local)" in stdout


def test_sweep_report_matches_the_runs_summaries(resumed_sweep):
    out = resumed_sweep["out"]
    for f in ("report.md", "report.csv", "plots/frontier.png", "plots/curve_reward_raw.png"):
        assert (out / f).is_file(), f
    with open(out / "report.csv", newline="") as f:
        rows = {r["arm"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["kl.estimator=k1", "kl.estimator=k3"]
    runs = state(out)
    gold = {
        (r["arm"], r["seed"]): json.loads((out / r["dir"] / "summary.json").read_text())["eval/gold_score"]
        for r in runs.values()
    }
    t = t_quantile(0.975, 1)
    assert t == pytest.approx(12.706, abs=1e-3)
    for arm, row in rows.items():
        assert (row["seeds"], row["finished"], row["failed"]) == ("2", "2", "0")
        a, b = gold[(arm, 0)], gold[(arm, 1)]
        mean, sd = (a + b) / 2, abs(a - b) / 2**0.5  # two values: s = |a − b| / √2
        assert float(row["eval/gold_score:mean"]) == pytest.approx(mean)
        if sd > 0:
            assert float(row["eval/gold_score:ci_high"]) == pytest.approx(mean + t * sd / 2**0.5)
        base = {s: gold[("kl.estimator=k1", s)] for s in (0, 1)}
        mine = {s: gold[(arm, s)] for s in (0, 1)}
        assert float(row["eval/gold_score:diff"]) == pytest.approx(
            paired_difference(mine, base).mean, abs=1e-12
        )
        assert float(row["eval/gold_score:n"]) == mean_interval([a, b]).n == 2
    assert rows["kl.estimator=k1"]["baseline"] == "1"
    md = (out / "report.md").read_text()
    assert "2 arms × 2 seeds (0, 1) = 4 runs: 4 finished, 0 failed" in md
    assert "![frontier](plots/frontier.png)" in md


# ---------------------------------------------------------------------------------------------
# A failing arm


REWARDS = """
import os

import torch


def ok(prompts, completions, **fields):
    with open(os.environ["SWEEP_TEST_THREADS"], "w") as f:
        f.write(str(torch.get_num_threads()))
    return [len(c) / 10 for c in completions]


def boom(prompts, completions, **fields):
    raise RuntimeError("reward exploded")
"""


def test_a_failing_arm_is_recorded_and_the_others_finish(smoke_pipeline, tmp_path, monkeypatch):
    mod = tmp_path / "mod"
    mod.mkdir()
    (mod / "sweep_rewards.py").write_text(textwrap.dedent(REWARDS))
    monkeypatch.syspath_prepend(str(mod))  # the sweep validates the arms here
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(mod), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("SWEEP_TEST_THREADS", str(tmp_path / "threads"))
    out = tmp_path / "sweep"
    argv = [
        "ppo", "--smoke", *FAST, "reward.name=callable", "--grid", "reward.fn=sweep_rewards:ok,sweep_rewards:boom",
        "--seeds", "1", "--workers", "2", "--out", str(out),
    ]  # fmt: skip
    code, stdout, _ = sweep_main(*argv)
    assert code == 1, stdout
    runs = state(out)
    good, bad = runs["reward.fn=sweep_rewards_ok__seed0"], runs["reward.fn=sweep_rewards_boom__seed0"]
    assert good["status"] == "completed"
    assert bad["status"] == "failed" and "RuntimeError: reward exploded" in bad["error"]
    assert "\n" not in bad["error"]
    assert "failed: reward.fn=sweep_rewards_boom__seed0: " in stdout and "--retry-failed" in stdout
    md = (out / "report.md").read_text()
    assert "## Failed runs" in md and "reward exploded" in md
    assert int((tmp_path / "threads").read_text()) == max(1, (os.cpu_count() or 1) // 2)

    # the same command again: nothing to run, the failure stays recorded
    code, stdout, _ = sweep_main(*argv)
    assert code == 1 and "to run" not in stdout
    assert attempts_in_log(out, bad["name"]) == 1

    # with --retry-failed only the failed run would run again, from scratch
    code, stdout, _ = sweep_main(*argv, "--retry-failed", "--dry-run")
    assert code == 0
    plan = {line.split()[0]: line.split(maxsplit=1)[1] for line in stdout.splitlines() if "__seed0" in line}
    assert plan == {good["name"]: "completed", bad["name"]: "to retry"}


def test_what_a_rerun_does_with_each_run(tmp_path):
    spec = sweep.SweepSpec(
        "ppo", ["rl.iterations=1"], [sweep.Axis("kl.estimator", ("k1", "k2", "k3", "abs"))], seeds=[0]
    )
    plan = sweep.plan_sweep(spec, tmp_path)
    completed, failed, started, untouched = plan.runs
    sweep._save(plan, [{"name": r.name, "status": "failed", "error": "x"} for r in (failed,)])
    for run, summary in ((completed, {"run/status": "completed"}), (started, {"run/status": "interrupted"})):
        (tmp_path / run.dir).mkdir(parents=True)
        (tmp_path / run.dir / "summary.json").write_text(json.dumps(summary))
    actions = lambda retry: {r["name"]: r["action"] for r in sweep.initial_state(plan, retry)}  # noqa: E731
    assert actions(False) == {
        completed.name: "skip",
        failed.name: "skip",
        started.name: "resume",
        untouched.name: "fresh",
    }
    assert actions(True)[failed.name] == "overwrite"
    # a directory holding a sweep of another base is refused, not mixed
    other = sweep.plan_sweep(sweep.SweepSpec("ppo", ["rl.iterations=2"], spec.grid, seeds=[0]), tmp_path)
    with pytest.raises(sweep.SweepError, match="holds a sweep with another overrides"):
        sweep.initial_state(other, False)


def test_how_a_run_ended_is_classified(tmp_path):
    task = sweep.RunTask("r", "ppo", [], str(tmp_path / "run"), str(tmp_path / "r.log"), True, "fresh", 1, {})
    (tmp_path / "run").mkdir()
    log = tmp_path / "r.log"
    log.write_text("=== cmd\nTraceback ...\nerror: rl stage failed: ValueError: bad\n")
    assert sweep.classify(task, 1, 2.0).error == "rl stage failed: ValueError: bad"
    log.write_text("=== cmd\n")
    crashed = sweep.classify(task, -signal.SIGKILL, 2.0)  # a hard crash: no summary, no error line
    assert crashed.status == "failed" and crashed.error == "killed by SIGKILL"
    assert sweep.classify(task, 130, 1.0).status == "interrupted"
    (tmp_path / "run" / "summary.json").write_text(
        json.dumps({"run/status": "failed", "run/error": "eval: x\ny"})
    )
    assert sweep.classify(task, 1, 1.0).error == "eval: x"
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"run/status": "completed"}))
    assert sweep.classify(task, 0, 1.0).status == "completed"


def test_progress_is_one_updating_line_on_a_terminal_and_plain_lines_otherwise():
    class Stream(io.StringIO):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty

    for tty in (True, False):
        s = Stream(tty)
        p = sweep.Progress(total=3, done=1, failed=0, workers=2, stream=s)
        p.started("a", "fresh")
        p.finished(sweep.RunResult("a", "completed", None, 0, 10.0))
        p.started("b", "resume")
        p.finished(sweep.RunResult("b", "failed", "boom", 1, 5.0))
        p.close()
        text = s.getvalue()
        assert "3/3 done" not in text and "2/3 done · 0 running · 1 failed" in text
        assert "FAIL  b: boom" in text
        if tty:
            assert "\r\x1b[K" in text
        else:
            assert "\r" not in text and "start b (resume)" in text and "ETA" in text


# ---------------------------------------------------------------------------------------------
# Ray


def test_ray_executor_runs_a_tiny_sweep_on_a_local_instance(smoke_pipeline, tmp_path):
    ray = pytest.importorskip("ray")
    out = tmp_path / "sweep"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        code, stdout, err = sweep_main(
            "ppo", "--smoke", *FAST, "--grid", "kl.estimator=k1,k3", "--seeds", "1", "--workers", "2",
            "--executor", "ray", "--out", str(out),
        )  # fmt: skip
        assert ray.is_initialized()  # an instance the sweep did not start is left running
    finally:
        ray.shutdown()
    assert code == 0, (stdout, err)
    assert "2 at a time, 1 torch thread(s) each (ray)" in stdout  # 2 CPUs / 2 workers
    runs = state(out)
    assert sorted(r["status"] for r in runs.values()) == ["completed", "completed"]
    for r in runs.values():
        assert json.loads((out / r["dir"] / "summary.json").read_text())["run/status"] == "completed"
    assert (out / "report.md").is_file()


def test_ray_executor_without_ray_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)
    code, _, err = sweep_main(
        "ppo",
        "--smoke",
        *FAST,
        "--grid",
        "kl.estimator=k1,k3",
        "--executor",
        "ray",
        "--out",
        str(tmp_path / "s"),
    )
    assert code == 2 and "pip install instructrl[ray]" in err and len(err.strip().splitlines()) == 1
