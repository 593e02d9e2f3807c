"""Third-party plugins: the example package installed without network or build isolation into a
temporary target, discovered through the `instructrl` entry-point group, listed with its package
and used (all five of its components) in a smoke RL run; and plugin hygiene — two distributions
sharing an entry-point name, a clash with a built-in, a plugin that fails to import,
`INSTRUCTRL_DISABLE_PLUGINS`, a recipe section claimed twice, a component that does not implement
its protocol.

Throwaway distributions are bare ``*.dist-info`` directories (``METADATA`` + ``entry_points.txt``)
in a temporary directory put on the path: ``importlib.metadata`` discovers them, nothing is
installed into the virtualenv. Subprocesses are used only where the point is the launcher or
entry-point discovery in a fresh interpreter.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from instructrl.core import registry as registry_module
from instructrl.core.errors import PluginError
from instructrl.core.hookspecs import hookimpl
from instructrl.core.registry import BuildContext, make_registry
from instructrl.core.types import LossOutput, Needs

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "instructrl-example-plugin"
EXAMPLE_COMPONENTS = {
    ("kl_estimator", "k3_clamped"),
    ("advantage", "batch_mean"),
    ("extra_loss", "entropy_bonus"),
    ("reward_transform", "group_rank"),
    ("kl_controller", "quantile_kl"),
}


def pip_install_target(src: Path, target: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(src),
        ],
        check=True,
        capture_output=True,
        text=True,
    )


def fake_dist(site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """A distribution ``dist`` in ``site`` without installing anything: its modules and a
    ``*.dist-info`` directory with ``METADATA`` and ``entry_points.txt``."""
    for name, source in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
    eps = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[instructrl]\n{eps}")
    (info / "top_level.txt").write_text("".join(f"{m}\n" for m in modules))


@pytest.fixture(scope="module")
def example_target(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    pip_install_target(EXAMPLE, target)
    return target


SHARED_PLUGIN = """
from instructrl.core.hookspecs import hookimpl

@hookimpl
def register_kl_estimators(register):
    register("{name}", lambda config, ctx: None)
"""

CLASH_PLUGIN = """
from instructrl.core.hookspecs import hookimpl

@hookimpl
def register_kl_estimators(register):
    register("k1", lambda config, ctx: None, description="a second k1")
"""

BROKEN_PLUGIN = "import a_module_that_does_not_exist\n"


@pytest.fixture(scope="module")
def hygiene_site(tmp_path_factory):
    """Four throwaway distributions: ``dup-alpha`` and ``dup-beta`` both provide entry point
    ``shared``; ``clashing-kl`` (entry point ``clash``) registers a second ``k1``;
    ``broken-plugin`` (entry point ``broken``) fails to import."""
    site = tmp_path_factory.mktemp("hygiene")
    fake_dist(
        site, "dup-alpha", {"shared": "dup_alpha"}, {"dup_alpha": SHARED_PLUGIN.format(name="alpha_kl")}
    )
    fake_dist(site, "dup-beta", {"shared": "dup_beta"}, {"dup_beta": SHARED_PLUGIN.format(name="beta_kl")})
    fake_dist(site, "clashing-kl", {"clash": "clash_plugin"}, {"clash_plugin": CLASH_PLUGIN})
    fake_dist(site, "broken-plugin", {"broken": "broken_plugin"}, {"broken_plugin": BROKEN_PLUGIN})
    return site


def cli(paths: list[Path], *args: str, **env_vars: str) -> subprocess.CompletedProcess:
    """``instructrl ARGS`` in a fresh interpreter with entry-point autoload on and ``paths`` first
    on ``PYTHONPATH``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("INSTRUCTRL_DISABLE_PLUGIN_AUTOLOAD", "INSTRUCTRL_DISABLE_PLUGINS")
    }
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), env.get("PYTHONPATH", "")])
    env.update(env_vars)
    return subprocess.run(
        [sys.executable, "-m", "instructrl.core.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def listing(proc: subprocess.CompletedProcess) -> tuple[dict[tuple[str, str], dict], dict[str, dict]]:
    """``instructrl plugins --json`` → (``{(kind, name): row}``, ``{plugin: broken row}``)."""
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    return {(r["kind"], r["name"]): r for r in data["components"]}, {b["plugin"]: b for b in data["broken"]}


# ------------------------------------------------------------------------------------------
# Discovery and listing
# ------------------------------------------------------------------------------------------


def test_plugins_lists_installed_and_broken_plugins_and_exits_0(example_target, hygiene_site):
    rows, broken = listing(cli([example_target, hygiene_site], "plugins", "--json"))
    for key in EXAMPLE_COMPONENTS:
        assert rows[key]["package"] == "instructrl-example-plugin", key
        assert rows[key]["plugin"] == "example"
    assert rows[("kl_estimator", "k1")]["package"] == "instructrl"
    assert rows[("kl_estimator", "k1")]["description"] != "a second k1"
    assert set(broken) == {"shared", "broken", "clash"}
    # (a) two distributions, one entry-point name: both named in one error, neither loaded
    assert "'dup-alpha' and 'dup-beta'" in broken["shared"]["error"]
    assert ("kl_estimator", "alpha_kl") not in rows and ("kl_estimator", "beta_kl") not in rows
    # a clash with a built-in names both packages
    err = broken["clash"]["error"]
    assert "kl_estimator 'k1' is registered twice" in err
    assert "package 'instructrl'" in err and "package 'clashing-kl'" in err
    # (c) a plugin that fails to import: named with its package, the import error and the switch
    err = broken["broken"]["error"]
    assert "plugin 'broken' from package 'broken-plugin' failed to load" in err
    assert "a_module_that_does_not_exist" in err and "INSTRUCTRL_DISABLE_PLUGINS=broken" in err
    assert all("\n" not in b["error"] for b in broken.values())


def test_disable_plugins_hides_entry_points_and_builtin_modules(example_target, hygiene_site):
    # (b) an entry-point name and a built-in module name; with the built-in KL module gone, the
    # clashing k1 no longer clashes and is the only k1
    proc = cli(
        [example_target, hygiene_site],
        "plugins",
        "--json",
        INSTRUCTRL_DISABLE_PLUGINS="example, shared,instructrl.plugins.kl",
    )
    rows, broken = listing(proc)
    assert not EXAMPLE_COMPONENTS & set(rows)
    assert {n for k, n in rows if k == "kl_controller"} == set()
    assert {n for k, n in rows if k == "kl_estimator"} == {"k1"}
    assert rows[("kl_estimator", "k1")]["package"] == "clashing-kl"
    assert ("objective", "ppo_clip") in rows and ("advantage", "gae") in rows
    assert set(broken) == {"broken"}


def test_autoload_off_hides_third_party_plugins(example_target, hygiene_site):
    rows, broken = listing(
        cli([example_target, hygiene_site], "plugins", "--json", INSTRUCTRL_DISABLE_PLUGIN_AUTOLOAD="1")
    )
    assert not EXAMPLE_COMPONENTS & set(rows) and ("kl_estimator", "k1") in rows
    assert broken == {}


def test_a_broken_plugin_stops_a_run_with_one_line_until_disabled(example_target, hygiene_site):
    paths = [example_target, hygiene_site]
    # (c) any command but `plugins` stops with exit 2 and one line naming the plugin and the switch
    proc = cli(paths, "run", "ppo", "--smoke", "--dry-run", INSTRUCTRL_DISABLE_PLUGINS="shared,clash")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "plugin 'broken' from package 'broken-plugin' failed to load" in line
    assert "INSTRUCTRL_DISABLE_PLUGINS=broken" in line
    # the switch it names works, and the example's components resolve from their entry point
    proc = cli(
        paths,
        "run", "ppo", "--smoke", "--dry-run", "--json",
        "kl.controller=quantile_kl", "kl.quantile=0.5", "entropy_bonus.coef=0.05",
        INSTRUCTRL_DISABLE_PLUGINS="shared,clash,broken",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["config"]["kl"]["controller"] == "quantile_kl" and info["config"]["kl"]["quantile"] == 0.5
    assert info["extra_losses"] == ["entropy_bonus"]


def test_broken_plugins_in_process_and_the_text_listing(example_target, hygiene_site, monkeypatch, capsys):
    from instructrl.core import cli as cli_module

    monkeypatch.syspath_prepend(str(hygiene_site))
    monkeypatch.syspath_prepend(str(example_target))
    with pytest.raises(PluginError) as err:
        make_registry(autoload=True)
    assert "\n" not in str(err.value) and "(skip it with INSTRUCTRL_DISABLE_PLUGINS=" in str(err.value)
    reg = make_registry(autoload=True, strict=False)
    assert {b.plugin for b in reg.broken} == {"shared", "broken", "clash"}
    assert reg.get("kl_estimator", "k1").package == "instructrl"
    assert reg.get("kl_controller", "quantile_kl").package == "instructrl-example-plugin"
    monkeypatch.setattr(registry_module, "_REGISTRY", reg)
    assert cli_module.main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "broken plugins (left out)" in out
    broken_lines = out.split("broken plugins (left out)")[1].strip().splitlines()
    assert [line.split()[:2] for line in broken_lines] == [[b.plugin, b.package] for b in reg.broken]
    assert "quantile_kl" in out and "instructrl-example-plugin" in out


def test_example_package_own_tests_pass(example_target):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(example_target)},
        cwd=str(EXAMPLE),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " passed" in proc.stdout and "failed" not in proc.stdout and "skipped" not in proc.stdout


# ------------------------------------------------------------------------------------------
# The example's components in a smoke RL run
# ------------------------------------------------------------------------------------------

TARGET, HORIZON = 1e-6, 100


def test_smoke_rl_run_uses_every_example_component(example_target, smoke_pipeline, tmp_path, monkeypatch):
    from instructrl.core.config import load_recipe
    from instructrl.core.runner import run_recipe

    monkeypatch.syspath_prepend(str(example_target))
    reg = make_registry(autoload=True)
    overrides = [
        "kl.estimator=k3_clamped", "kl.max_value=5", "advantage.name=batch_mean",
        "kl.controller=quantile_kl", "kl.quantile=1.0", f"kl.target={TARGET}", f"kl.horizon={HORIZON}",
        "entropy_bonus.coef=0.05", "reward_transforms=[{name: demo_bias}, {name: group_rank}]",
        "rollout.samples_per_prompt=4", "rl.micro_batch_size=8", "eval.every=0",
    ]  # fmt: skip
    recipe = load_recipe("ppo", overrides, smoke=True, registry=reg)
    assert recipe.choice("kl.estimator").config.max_value == 5.0
    summary = run_recipe(recipe, tmp_path / "run", log=lambda *a: None)
    assert summary["run/status"] == "completed"
    config = (tmp_path / "run" / "config.yaml").read_text()
    for name in ("estimator: k3_clamped", "name: batch_mean", "controller: quantile_kl", "name: group_rank"):
        assert name in config
    assert "entropy_bonus:" in config
    # the k3 estimate is non-negative by construction, so the logged KL is too
    assert summary["rl/kl/value"] >= 0.0

    rows = [r for r in csv.DictReader(open(tmp_path / "run" / "rl" / "metrics.csv")) if r.get("kl/coef_next")]
    assert len(rows) == 2  # the smoke run's iterations
    for r in rows:
        # entropy_bonus: its metric is logged, and a policy's entropy is positive
        assert float(r["entropy_bonus/entropy"]) > 0.0
        # group_rank: centred ranks of each prompt's 4 samples sum to 0
        assert float(r["reward/after/group_rank"]) == pytest.approx(0.0, abs=1e-6)
    # quantile_kl with quantile 1 (the max per-sequence KL, which is >= the logged mean m since
    # every per-sequence k3 KL is >= 0): e = clip(max/target − 1, ±0.2) >= clip(m/target − 1, ±0.2),
    # so m >= 1.2·target forces e = +0.2; m = 0 means every sequence is at 0, e = −0.2
    assert float(rows[0]["kl/coef"]) == pytest.approx(recipe.choice("kl.controller").config.coef)
    for prev, r in zip(rows, rows[1:]):
        assert float(r["kl/coef"]) == pytest.approx(float(prev["kl/coef_next"]))
    for r in rows:
        n = float(r["episodes"]) / (float(r["iteration"]) + 1)
        m, ratio = float(r["kl/value"]), float(r["kl/coef_next"]) / float(r["kl/coef"])
        low = 1 + min(max(m / TARGET - 1, -0.2), 0.2) * n / HORIZON
        assert low - 1e-6 <= ratio <= 1 + 0.2 * n / HORIZON + 1e-6
        if m == 0.0:
            assert ratio == pytest.approx(1 - 0.2 * n / HORIZON)
    # iteration 0 samples from the reference itself (KL 0: β falls); after two epochs of updates
    # the policy has moved (β rises by the full clipped step)
    first, last = rows[0], rows[-1]
    assert float(first["kl/value"]) == pytest.approx(0.0, abs=1e-9)
    assert float(first["kl/coef_next"]) < float(first["kl/coef"])
    assert float(last["kl/value"]) >= 1.2 * TARGET
    n = float(last["episodes"]) / (float(last["iteration"]) + 1)
    assert float(last["kl/coef_next"]) / float(last["kl/coef"]) == pytest.approx(1 + 0.2 * n / HORIZON)
    assert summary["rl/kl/coef_next"] == pytest.approx(float(last["kl/coef_next"]))


# ------------------------------------------------------------------------------------------
# Registration and build errors (in process)
# ------------------------------------------------------------------------------------------


class ExtraLossNamedEval:
    """(d) an extra loss named like a recipe section, beside a component that is fine."""

    @hookimpl
    def register_extra_losses(self, register):
        register("eval", lambda config, ctx: None)

    @hookimpl
    def register_kl_estimators(self, register):
        register("innocent_kl", lambda config, ctx: None)


class ExtraLossNamedKL:
    @hookimpl
    def register_extra_losses(self, register):
        register("kl", lambda config, ctx: None)


@pytest.mark.parametrize(
    ("plugin", "section", "owner"),
    [
        (ExtraLossNamedEval(), "eval", "stage 'eval' of package 'instructrl'"),
        (ExtraLossNamedKL(), "kl", "the core recipe schema"),
    ],
)
def test_an_extra_loss_named_like_a_recipe_section_breaks_its_plugin(plugin, section, owner):
    reg = make_registry([plugin], autoload=False, strict=False)
    assert len(reg.broken) == 1
    broken = reg.broken[0]
    assert type(plugin).__qualname__ in broken.plugin
    msg = broken.message()
    assert f"recipe section '{section}' is claimed twice" in msg
    assert owner in msg and f"extra_loss '{section}' of package '{broken.package}'" in msg
    assert f"INSTRUCTRL_DISABLE_PLUGINS={broken.plugin}" in msg and "\n" not in msg
    # the whole plugin is left out, the built-ins are not
    assert "innocent_kl" not in reg.names("kl_estimator") and section not in reg.names("extra_loss")
    assert "eval" in reg.names("stage") and "k1" in reg.names("kl_estimator")
    with pytest.raises(PluginError, match=f"recipe section '{section}' is claimed twice"):
        make_registry([plugin], autoload=False)


class NoAggregation:
    def __call__(self, inp):
        return LossOutput(inp.logprobs, {})


class TwoPositionalKL:
    def __call__(self, logprobs, ref_logprobs):  # the pre-v1 signature
        return logprobs - ref_logprobs


class NoLoadStateController:
    coef = 0.1

    def update(self, inp):
        pass

    def state_dict(self):
        return {}


class PreV1Transform:
    def __call__(self, scores, *, prompts):
        return scores


class ExtraLossWithoutCoef:
    def __call__(self, inp):
        return LossOutput(inp.output.logprobs.sum(), {})


class StatefulWithoutState:
    def __call__(self, inp):
        return inp.scores


class ProtocolMisfits:
    @hookimpl
    def register_objectives(self, register):
        register("no_aggregation", lambda config, ctx: NoAggregation())

    @hookimpl
    def register_kl_estimators(self, register):
        register("two_positional", lambda config, ctx: TwoPositionalKL())

    @hookimpl
    def register_kl_controllers(self, register):
        register("no_load_state", lambda config, ctx: NoLoadStateController())

    @hookimpl
    def register_reward_transforms(self, register):
        register("pre_v1", lambda config, ctx: PreV1Transform())
        register("stateless", lambda config, ctx: StatefulWithoutState(), needs=Needs(stateful=True))

    @hookimpl
    def register_extra_losses(self, register):
        register("no_coef", lambda config, ctx: ExtraLossWithoutCoef())


@pytest.mark.parametrize(
    ("kind", "name", "protocol", "problem"),
    [
        ("objective", "no_aggregation", "Objective", "missing attribute 'aggregation'"),
        ("kl_estimator", "two_positional", "KLEstimator", "method __call__ requires argument 'ref_logprobs'"),
        ("kl_controller", "no_load_state", "KLController", "missing method load_state_dict"),
        (
            "reward_transform",
            "pre_v1",
            "RewardTransform",
            "method __call__ requires keyword argument 'prompts'",
        ),
        ("extra_loss", "no_coef", "ExtraLoss", "missing attribute 'coef'"),
        # declared Needs(stateful=True): checked against Stateful too
        ("reward_transform", "stateless", "Stateful", "missing method state_dict"),
    ],
)
def test_a_component_that_misses_its_protocol_fails_when_built(kind, name, protocol, problem):
    # (e) registration is fine (factories are not called); building checks the object
    reg = make_registry([ProtocolMisfits()], autoload=False)
    assert name in reg.names(kind)
    with pytest.raises(PluginError) as err:
        reg.build(kind, name, None, BuildContext(registry=reg))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{kind} '{name}' (plugin ")
    assert "ProtocolMisfits" in msg and re.search(f"does not implement {protocol}: {re.escape(problem)}", msg)
    assert reg.builds == 1
