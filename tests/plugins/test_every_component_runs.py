"""Every registered component runs in a --smoke RL run (one parametrised test over the registry,
so a new built-in is covered automatically)."""

from __future__ import annotations

import json
import textwrap

import pytest
from instructrl.core.errors import ConfigError
from instructrl.core.registry import KINDS, make_registry

FAST = ["rl.iterations=1", "eval.every=0", "eval.n_prompts=8", "eval.greedy=false"]

# How to select a component whose recipe key is not simply `<block>.name=<name>`.
SELECT = {
    "kl_estimator": lambda n: [f"kl.estimator={n}"],
    "kl_controller": lambda n: [f"kl.controller={n}", "kl.target=1.0"],
    "reward_transform": lambda n: [f"reward_transforms=[{{name: {n}}}]"],
    "extra_loss": lambda n: [f"{n}.coef=1.0"],
    "logger": lambda n: [f"loggers=[{{name: csv}}, {{name: {n}}}]"],
    "reward_model": lambda n: [f"reward.name={n}"],
}
EXTRA = {
    ("reward_model", "callable"): ["reward.fn=smoke_rewards:length_match"],
    ("reward_model", "ensemble"): ["reward.members=[{name: learned, model: '@rm'}, {name: gold}]"],
    ("reward_model", "learned"): ["reward.model=@rm"],
}
# Components that need a package the test environment may not have.
OPTIONAL_PACKAGE = {
    ("logger", "wandb"): "wandb",
    ("logger", "mlflow"): "mlflow",
    ("logger", "tensorboard"): "tensorboard",
}

CALLABLE = """
def length_match(prompts, completions, completion_ended, answer, **fields):
    return [1.0 - abs(len(c) - len(a)) / 10 for c, a in zip(completions, answer)]
"""


def cases():
    reg = make_registry(autoload=False)
    out = []
    for kind, spec in KINDS.items():
        for name in reg.names(kind):
            if kind in ("task", "stage", "command"):
                continue  # tasks and stages run whole pipelines (tests/plugins/stages/), commands their own tests
            select = SELECT.get(kind, lambda n, key=spec.recipe_key: [f"{key}={n}"])
            out.append(
                pytest.param(kind, name, select(name) + EXTRA.get((kind, name), []), id=f"{kind}-{name}")
            )
    return out


@pytest.fixture(scope="module")
def reward_module(tmp_path_factory):
    d = tmp_path_factory.mktemp("rewards")
    (d / "smoke_rewards.py").write_text(textwrap.dedent(CALLABLE))
    return d


@pytest.mark.parametrize(("kind", "name", "overrides"), cases())
def test_component_runs_in_a_smoke_rl_run(
    kind, name, overrides, smoke_pipeline, run_smoke, reward_module, tmp_path, monkeypatch
):
    monkeypatch.syspath_prepend(str(reward_module))
    package = OPTIONAL_PACKAGE.get((kind, name))
    if package is not None:
        import importlib.util

        if importlib.util.find_spec(package) is None:
            with pytest.raises(ConfigError, match=rf"needs the '{package}' package"):
                run_smoke(tmp_path / "run", "ppo", [*overrides, *FAST])
            return
    summary = run_smoke(tmp_path / "run", "ppo", [*overrides, *FAST])
    assert summary["run/status"] == "completed"
    assert summary["rl/iterations"] == 1
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert name in config
    rows = (tmp_path / "run" / "rl" / "metrics.csv").read_text().splitlines()
    assert len(rows) >= 2  # header + one iteration


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        (
            ["advantage.name=grpo", "kl.placement=loss", "kl.estimator=k3"],
            lambda s: s["rl/kl/loss_term"] >= 0.0,
        ),
        (
            ["advantage.name=rloo", "kl.placement=loss", "kl.estimator=full"],
            lambda s: s["rl/kl/loss_term"] >= -1e-6,
        ),
        (
            ["kl.controller=adaptive", "kl.target=0.001", "kl.horizon=10"],
            lambda s: s["rl/kl/coef_next"] != s["rl/kl/coef"],
        ),
        (
            ["rl.micro_batch_size=2", "objective.aggregation=seq_mean_token_sum_norm"],
            lambda s: s["run/status"] == "completed",
        ),
        (
            ["objective.clip_high=0.28", "objective.dual_clip=3.0"],
            lambda s: 0.0 <= s["rl/policy/clip_frac"] <= 1.0,
        ),
    ],
)
def test_combinations(overrides, check, smoke_pipeline, run_smoke, tmp_path):
    summary = run_smoke(tmp_path / "run", "ppo", [*overrides, *FAST])
    assert check(summary), json.dumps({k: v for k, v in summary.items() if k.startswith("rl/")}, indent=1)


def test_callable_reward_errors_name_the_function(smoke_pipeline, run_smoke, tmp_path, monkeypatch):
    from instructrl.core.errors import RunFailure

    (tmp_path / "bad_rewards.py").write_text("def short(prompts, completions, **kw):\n    return [0.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        RunFailure,
        match=r"reward function bad_rewards:short returned 1 values for \d+ completions on a batch of \d+ \(first prompt '",
    ):
        run_smoke(tmp_path / "run", "ppo", ["reward.name=callable", "reward.fn=bad_rewards:short", *FAST])
    with pytest.raises(ConfigError, match=r"^reward\.fn: cannot import module 'no_such_module'"):
        run_smoke(tmp_path / "run2", "ppo", ["reward.name=callable", "reward.fn=no_such_module:f", *FAST])
