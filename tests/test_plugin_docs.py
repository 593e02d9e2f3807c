"""The examples of docs/plugins.md run: one complete plugin module per kind, each registered under
its kind with a description, protocol-checked when built, checked by hand where it has maths, and
all exercised end to end in two ``--smoke`` RL runs and one launcher command."""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from instructrl.core import registry as registry_module
from instructrl.core.discovery import protocol_problem
from instructrl.core.errors import ConfigError, PluginError
from instructrl.core.plugin_api import (
    AdvantageInput,
    Completion,
    ControllerInput,
    ExtraLossInput,
    KLInput,
    LossOutput,
    ObjectiveInput,
    PolicyOutput,
    Prompt,
    RewardInput,
    TokenBatch,
    TransformInput,
    hookimpl,
)
from instructrl.core.registry import KINDS, BuildContext, make_registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
EXAMPLE = re.compile(r"<!-- example: (\w+) -->\n```python\n(.*?)\n```", re.S)

FAST = ["eval.every=0", "eval.n_prompts=8", "eval.greedy=false"]
SCALE, MAX_ABS, RL_PROMPTS = 0.8, 0.05, 24
# Run A: every example but the reward model, the advantage estimator and the transform.
RUN_A = [
    "stages=[example_task_stats,rl,eval]",
    "task.name=example_small_world",
    f"task.rl_prompts={RL_PROMPTS}",
    "policy.name=example_tempered_hf",
    f"policy.temperature_scale={SCALE}",
    "value.name=example_bounded_value",
    f"value.max_abs={MAX_ABS}",
    "objective.name=example_clipped_pg",
    "kl.estimator=example_huber",
    "kl.controller=example_linear_decay",
    "example_entropy_bonus.coef=0.01",
    "loggers=[{name: csv}, {name: example_csv_subdir}]",
    *FAST,
]
# Run B: the same task (its upstream stages come from the cache), the other three examples.
RUN_B = [
    "stages=[example_task_stats,rl,eval]",
    "task.name=example_small_world",
    f"task.rl_prompts={RL_PROMPTS}",
    "reward.name=example_concise_gold",
    "advantage.name=example_group_median",
    "reward_transforms=[{name: example_group_rank}]",
    *FAST,
]


def doc_examples() -> list[tuple[str, str]]:
    """``(kind, source)`` of every ``<!-- example: KIND -->`` block, in document order."""
    return EXAMPLE.findall(DOC.read_text())


_MODULES: dict[str, types.ModuleType] = {}


def example_module(kind: str) -> types.ModuleType:
    """The example block of ``kind`` executed as a module (once per session)."""
    if kind not in _MODULES:
        source = dict(doc_examples())[kind]
        name = f"instructrl_doc_example_{kind}"
        module = types.ModuleType(name)
        module.__file__ = f"{DOC}:{kind}"
        sys.modules[name] = module  # dataclass/OmegaConf type-hint resolution looks the module up
        exec(compile(source, module.__file__, "exec"), module.__dict__)
        _MODULES[kind] = module
    return _MODULES[kind]


_REGISTRY: list = []


def example_registry():
    """The built-ins plus all 13 example modules, no entry points (built once: a registry is
    read-only apart from its ``builds`` counter)."""
    if not _REGISTRY:
        _REGISTRY.append(make_registry([example_module(kind) for kind in KINDS], autoload=False))
    return _REGISTRY[0]


def example_spec(reg, kind: str):
    """The one component the example module of ``kind`` registers."""
    mine = [s for s in reg.all() if s.plugin == example_module(kind).__name__]
    assert len(mine) == 1, [s.name for s in mine]
    return mine[0]


def build(reg, kind: str, block: dict | None = None, **ctx_fields):
    """Build the example of ``kind`` from a recipe block (the registry checks the protocol)."""
    spec = example_spec(reg, kind)
    config = reg.config_for_block(kind, spec.name, block or {}, kind)
    return reg.build(kind, spec.name, config, BuildContext(registry=reg, **ctx_fields))


def metrics(path: Path) -> list[dict[str, float]]:
    """The per-iteration rows of a Lightning ``metrics.csv`` (empty cells dropped)."""
    with open(path) as f:
        rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    rows = [r for r in rows if "iteration" in r]
    assert rows, f"no iteration rows in {path}"
    return sorted(rows, key=lambda r: r["iteration"])


# ------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------


def test_the_doc_has_exactly_one_example_per_kind():
    kinds = [k for k, _ in doc_examples()]
    assert sorted(kinds) == sorted(KINDS), kinds


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_example_registers_one_component_of_its_kind(kind):
    module = example_module(kind)
    hook = KINDS[kind].hook
    assert getattr(getattr(module, hook, None), "instructrl_impl", None) is not None, f"no @hookimpl {hook}"
    reg = make_registry([module], autoload=False)  # strict: a broken example raises here
    spec = example_spec(reg, kind)
    assert spec.kind == kind and spec.name.startswith("example_")
    assert spec.description and "\n" not in spec.description
    if KINDS[kind].instance:  # stages and commands are checked as they register
        assert protocol_problem(spec.factory, KINDS[kind].protocol) is None


def test_all_examples_register_together_with_the_builtins():
    reg = example_registry()
    assert not reg.broken
    names = {kind: example_spec(reg, kind).name for kind in KINDS}
    assert len(set(names.values())) == len(KINDS)


# ------------------------------------------------------------------------------------------
# The components by hand (built through the registry, so protocol-checked)
# ------------------------------------------------------------------------------------------


def test_example_objective_caps_the_stop_gradient_weight():
    reg = example_registry()
    objective = build(reg, "objective", {"clip_high": 0.25})
    assert objective.aggregation == "token_mean"
    logprobs = torch.log(torch.tensor([[0.5, 0.4]])).requires_grad_()
    old = logprobs.detach() - torch.log(torch.tensor([[1.0, 2.0]]))  # ratios 1 and 2
    out = objective(
        ObjectiveInput(
            logprobs=logprobs, old_logprobs=old, advantages=torch.tensor([[1.0, -1.0]]), mask=torch.ones(1, 2)
        )
    )
    assert isinstance(out, LossOutput)
    expected = torch.tensor([[-1.0 * math.log(0.5), 1.25 * math.log(0.4)]])
    assert torch.allclose(out.loss.detach(), expected)
    out.loss.sum().backward()  # the weight is a constant: d/dlogπ = −w·A
    assert torch.allclose(logprobs.grad, torch.tensor([[-1.0, 1.25]]))
    assert float(out.metrics["clip_frac"]) == pytest.approx(0.5)
    assert float(out.metrics["weight_mean"]) == pytest.approx(1.125)


def test_example_advantage_subtracts_the_group_median():
    reg = example_registry()
    estimator = build(reg, "advantage")
    mask = torch.tensor([[1.0, 1.0, 0.0]] * 5)
    rewards = torch.zeros(5, 3)
    rewards[:, 1] = torch.tensor([1.0, 2.0, 10.0, 3.0, 5.0])  # the score on the last real token
    out = estimator(
        AdvantageInput(rewards=rewards, values=None, mask=mask, group_ids=torch.tensor([0, 0, 0, 1, 1]))
    )
    assert out.returns is None
    expected = torch.tensor([-1.0, 0.0, 8.0, -1.0, 1.0]).unsqueeze(-1) * mask  # medians 2 and 4
    assert torch.allclose(out.advantages, expected)
    needs = reg.needs("advantage", "example_group_median")
    assert (needs.min_samples_per_prompt, needs.default_samples_per_prompt, needs.values) == (2, 4, False)


def test_example_advantage_rejects_one_sample_per_prompt_at_validation():
    from instructrl.core.config import load_recipe

    reg = example_registry()
    builds = reg.builds
    with pytest.raises(ConfigError, match=r"advantage 'example_group_median' compares samples of one prompt"):
        load_recipe("ppo", [*RUN_B, "rollout.samples_per_prompt=1"], smoke=True, registry=reg)
    assert reg.builds == builds  # validation reads the declared Needs; it builds nothing


def test_example_kl_estimator_is_quadratic_then_linear():
    reg = example_registry()
    estimator = build(reg, "kl_estimator", {"delta": 1.0})
    ref = torch.zeros(1, 3)
    out = estimator(KLInput(logprobs=torch.tensor([[0.5, -3.0, 0.0]]), ref_logprobs=ref))
    assert torch.allclose(out, torch.tensor([[0.125, 2.5, 0.0]]))
    with pytest.raises(ConfigError, match=r"^kl\.delta must be > 0"):
        reg.config_for_block("kl_estimator", "example_huber", {"delta": 0.0}, "kl")


def test_example_kl_controller_decays_linearly_and_restores_its_state():
    reg = example_registry()
    controller = build(reg, "kl_controller", {"coef": 0.2})
    seen = []
    for it in range(4):
        seen.append(controller.coef)
        controller.update(
            ControllerInput(
                kl=torch.zeros(2),
                mean_kl=0.0,
                scores=torch.zeros(2),
                n_episodes=2,
                iteration=it,
                iterations=4,
            )
        )
    assert seen == pytest.approx([0.2, 0.15, 0.1, 0.05]) and controller.coef == 0.0
    fresh = build(reg, "kl_controller", {"coef": 0.9})
    fresh.load_state_dict(json.loads(json.dumps(controller.state_dict())))  # plain data
    assert fresh.coef == 0.0 and fresh.start == pytest.approx(0.2)


def test_example_transform_centres_ranks_within_each_group():
    reg = example_registry()
    transform = build(reg, "reward_transform", {"scale": 2.0})
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0, 1.0, 1.0, 4.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 3, 3, 3])
    n = len(scores)
    out = transform(
        TransformInput(
            scores=scores,
            prompts=[Prompt(str(i), "p") for i in range(n)],
            completions=[Completion("c")] * n,
            ended=torch.ones(n, dtype=torch.bool),
            lengths=torch.ones(n, dtype=torch.long),
            group_ids=groups,
            max_new_tokens=4,
        )
    )
    # (1, 3) → (−2, 2); a tie → (0, 0); one sample → 0; (1, 1, 4) → mean ranks (½, ½, 2) → (−1, −1, 2)
    assert torch.allclose(out, torch.tensor([-2.0, 2.0, 0.0, 0.0, 0.0, -1.0, -1.0, 2.0]))
    for g in groups.unique():
        assert abs(float(out[groups == g].mean())) < 1e-6


def test_example_extra_loss_is_the_shared_mean_sequence_entropy():
    reg = example_registry()
    extra = build(reg, "extra_loss", {"coef": 0.5})
    assert extra.coef == 0.5
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    entropy = torch.tensor([[1.0, 3.0, 9.0], [4.0, 9.0, 9.0]], requires_grad=True)
    batch = TokenBatch(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4), torch.zeros(2, 4), mask, 1)
    out = extra(
        ExtraLossInput(
            batch=batch,
            output=PolicyOutput(torch.zeros(2, 3), entropy),
            policy=None,
            reference=None,
            task=None,
            step=0,
            micro_index=1,
            micro_count=4,
            share=0.25,
        )
    )
    # per-sequence means 2 and 4 → 3; loss = −0.5 · 0.25 · 3
    assert float(out.loss.detach()) == pytest.approx(-0.375)
    assert float(out.metrics["entropy"]) == pytest.approx(3.0)
    out.loss.backward()
    assert entropy.grad[0, 2] == 0.0 and entropy.grad[0, 0] < 0.0  # padding gets no gradient


def test_example_reward_model_penalises_gold_by_characters():
    reg = example_registry()
    world = reg.build(
        "task", "world", reg.config_for_block("task", "world", {}, "task"), BuildContext(registry=reg)
    )
    reward = build(reg, "reward_model", {"coef": 0.1}, task=world)
    prompts = list(world.prompts("eval"))[:3]
    completions = [Completion(str(p.fields["answer"])) for p in prompts[:2]] + [Completion("no idea\nsorry")]
    scores = reward.score(RewardInput(prompts=prompts, completions=completions, batch=None))
    gold = torch.tensor(world.gold.score(prompts, completions))
    chars = torch.tensor([float(len(c.text)) for c in completions])
    assert scores.dtype == torch.float32 and torch.allclose(scores, gold - 0.1 * chars)
    assert reward.demo_mean() is None
    with pytest.raises(ConfigError, match="needs a task with a gold judge"):
        build(reg, "reward_model")


def test_example_logger_writes_metrics_into_its_subdir(tmp_path):
    reg = example_registry()
    logger = build(reg, "logger", {"subdir": "mine"}, stage="rl", stage_dir=tmp_path)
    logger.log_metrics({"kl/coef": 0.5}, step=0)
    logger.save()
    assert "kl/coef" in (tmp_path / "mine" / "metrics.csv").read_text()


def test_example_task_cuts_only_the_rl_prompts():
    reg = example_registry()
    task = build(reg, "task", {"rl_prompts": 7, "n_rl_prompts": 50, "n_demos": 20})
    world = reg.build(
        "task",
        "world",
        reg.config_for_block("task", "world", {"n_rl_prompts": 50, "n_demos": 20}, "task"),
        BuildContext(registry=reg),
    )
    assert [p.id for p in task.prompts("rl")] == [p.id for p in world.prompts("rl")][:7]
    assert [p.id for p in task.prompts("eval")] == [p.id for p in world.prompts("eval")]
    assert len(task.demonstrations()) == 20 and task.gold is not None


def test_the_protocol_messages_quoted_in_the_doc():
    text = DOC.read_text()

    class NoAggregation:
        def __call__(self, inp):
            return LossOutput(inp.advantages, {})

    class NoTemperature:
        model = tokenizer = None

        def generate(self, input_ids, attention_mask, *, max_new_tokens, temperature, greedy=False): ...
        def forward(self, batch, *, return_logits=False): ...
        def lm_loss(self, input_ids, attention_mask): ...
        def reference(self): ...
        def save(self, path): ...

    class Bad:
        @hookimpl
        def register_objectives(self, register):
            register("example_no_aggregation", lambda config, ctx: NoAggregation(), description="x")

        @hookimpl
        def register_policies(self, register):
            register("example_no_temperature", lambda config, ctx: NoTemperature(), description="x")

    reg = make_registry([Bad()], autoload=False)
    with pytest.raises(PluginError) as err:
        reg.build("objective", "example_no_aggregation", None, BuildContext(registry=reg))
    quoted = "does not implement Objective: missing attribute 'aggregation'"
    assert quoted in str(err.value) and quoted in text
    with pytest.raises(PluginError) as err:
        reg.build("policy", "example_no_temperature", None, BuildContext(registry=reg))
    quoted = str(err.value).split(" does not implement ")[1]
    assert quoted.startswith("Policy: method forward has no keyword argument 'temperature'")
    assert f"does not implement {quoted}" in text, quoted


# ------------------------------------------------------------------------------------------
# End to end: two smoke runs, one command
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(run_smoke, tmp_path_factory):
    """Run A and run B against the built-ins + the examples (as the launcher's registry)."""
    from instructrl.core.api import dry_run

    reg = example_registry()
    root = tmp_path_factory.mktemp("plugin-doc-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry_module, "_REGISTRY", reg)
        summary_a = run_smoke(root / "a", "ppo", RUN_A)
        planned_b = dry_run("ppo", RUN_B, smoke=True, run_dir=root / "b")
        summary_b = run_smoke(root / "b", "ppo", RUN_B)
    return types.SimpleNamespace(
        reg=reg, a=root / "a", b=root / "b", summary_a=summary_a, summary_b=summary_b, planned_b=planned_b
    )


@pytest.mark.slow
def test_run_a_kl_controller_decays_beta_linearly(runs):
    beta = float(yaml.safe_load((runs.a / "config.yaml").read_text())["kl"]["coef"])
    rows = metrics(runs.a / "rl" / "metrics.csv")
    n = len(rows)
    assert runs.summary_a["run/status"] == "completed" and n == runs.summary_a["rl/iterations"] == 2
    for i, row in enumerate(rows):
        assert row["kl/coef"] == pytest.approx(beta * (1 - i / n), rel=1e-6)
        assert row["kl/coef_next"] == pytest.approx(beta * (1 - (i + 1) / n), rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_run_a_objective_estimator_extra_loss_and_value_model_act(runs):
    rows = metrics(runs.a / "rl" / "metrics.csv")
    for row in rows:
        assert 0.0 <= row["policy/clip_frac"] <= 1.0  # the objective's metrics, prefixed policy/
        assert 0.0 < row["policy/weight_mean"] <= 1.28 + 1e-6
        assert row["kl/per_token"] >= 0.0 and row["kl/value"] >= 0.0  # Huber is never negative
        assert row["example_entropy_bonus/entropy"] > 0.0  # <extra loss name>/<metric>
        assert abs(row["value/mean"]) < MAX_ABS  # the tanh squash
        assert "value/loss" in row  # gae declares Needs(values=True): the value model was built
    assert rows[-1]["kl/per_token"] > 0.0  # the policy moved away from the reference
    assert "rl/example_entropy_bonus/entropy" in runs.summary_a


@pytest.mark.slow
def test_run_a_logger_is_built_for_every_trainer_stage(runs):
    main_rows = metrics(runs.a / "rl" / "metrics.csv")
    copy_rows = metrics(runs.a / "rl" / "example_csv" / "metrics.csv")
    assert [r["kl/coef"] for r in copy_rows] == [r["kl/coef"] for r in main_rows]
    # built for the eval stage's Trainer too (eval logs its results to summary.json, not the loggers)
    assert (runs.a / "eval" / "example_csv").is_dir()


@pytest.mark.slow
def test_run_a_stage_counts_the_example_task(runs):
    from instructrl.core.config import load_recipe

    recipe = load_recipe("ppo", RUN_A, smoke=True, registry=runs.reg)
    choice = recipe.choice("task")
    assert choice.name == "example_small_world"
    task = runs.reg.build("task", choice.name, choice.config, BuildContext(registry=runs.reg))
    s = runs.summary_a
    assert s["example_task_stats/n_demonstrations"] == len(task.demonstrations()) > 0
    assert s["example_task_stats/n_prompts_rl"] == len(task.prompts("rl")) == RL_PROMPTS
    assert s["example_task_stats/n_prompts_eval"] == len(task.prompts("eval")) > 0
    stage_dir = runs.a / "example_task_stats"
    assert stage_dir.is_symlink()  # cached: the run dir links to the stage-cache entry
    assert (
        json.loads((stage_dir / "summary.json").read_text())["example_task_stats/n_prompts_rl"] == RL_PROMPTS
    )


@pytest.mark.slow
def test_run_a_policy_samples_and_scores_at_the_scaled_temperature(runs):
    from instructrl.plugins.stages.common import encode_prompts

    reg = runs.reg
    model_dir = str(runs.a / "rl" / "model")
    tempered = build(reg, "policy", {"model": model_dir, "temperature_scale": SCALE})
    hf = reg.build(
        "policy",
        "hf",
        reg.config_for_block("policy", "hf", {"model": model_dir}, "policy"),
        BuildContext(registry=reg),
    )
    ids, mask = encode_prompts(hf.tokenizer, ["reverse: abc\n", "sort: dcb\n"], 32)
    torch.manual_seed(0)
    batch = hf.generate(ids, mask, max_new_tokens=6, temperature=1.0).batch
    with torch.no_grad():
        mine = tempered.forward(batch, temperature=1.0).logprobs
        assert torch.allclose(mine, hf.forward(batch, temperature=SCALE).logprobs, atol=1e-6)
        assert not torch.allclose(mine, hf.forward(batch, temperature=1.0).logprobs)
    reference = tempered.reference()
    assert type(reference) is type(tempered) and reference.scale == SCALE
    config = (runs.a / "config.yaml").read_text()
    assert "example_tempered_hf" in config and f"temperature_scale: {SCALE}" in config


@pytest.mark.slow
def test_run_b_needs_derive_samples_and_no_value_model(runs):
    derived = runs.planned_b["derived"]["components"]
    assert derived["samples_per_prompt"] == 4 and derived["needs_values"] is False
    plan = {p["stage"]: p["status"] for p in runs.planned_b["plan"]}
    assert plan["example_task_stats"] == "cached" and "rm" not in plan  # no @rm without a critic or RM
    s = runs.summary_b
    assert s["run/status"] == "completed"
    cfg = yaml.safe_load((runs.b / "config.yaml").read_text())
    per_iteration = cfg["rollout"]["prompts_per_iteration"] * 4
    assert s["rl/episodes"] == s["rl/iterations"] * per_iteration
    rows = metrics(runs.b / "rl" / "metrics.csv")
    assert all("value/loss" not in r and "value/mean" not in r for r in rows)
    assert not (runs.b / "rm").exists()
    assert (runs.b / "example_task_stats").resolve() == (runs.a / "example_task_stats").resolve()


@pytest.mark.slow
def test_run_b_transform_and_reward_model_shape_the_reward(runs):
    rows = metrics(runs.b / "rl" / "metrics.csv")
    for row in rows:
        # centred ranks within each prompt's 4 samples: every group, so the batch, has mean 0
        assert abs(row["reward/after/example_group_rank"]) < 1e-6
        assert abs(row["reward/shaped"]) < 1e-6
        assert math.isfinite(row["reward/raw"])
    assert runs.summary_b["eval/judge"] == "gold"
    assert math.isfinite(runs.summary_b["eval/rm_score"])  # the example reward model scored in eval too


def test_example_command_prints_the_counts_through_the_launcher(monkeypatch, capsys):
    from instructrl.core.cli import main

    reg = example_registry()
    monkeypatch.setattr(registry_module, "_REGISTRY", reg)
    expected = {kind: len(reg.names(kind)) for kind in KINDS}
    assert main(["example_kinds", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == expected, err
    assert main(["example_kinds"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert {line.split()[0]: int(line.split()[1]) for line in lines} == expected
    assert main(["plugins"]) == 0
    listing = capsys.readouterr().out
    for kind in KINDS:
        spec = example_spec(reg, kind)
        assert spec.name in listing and spec.description in listing, spec.name
