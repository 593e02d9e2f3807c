"""A third-party plugin package, installed without network or build isolation into a temporary
target: discovered through the `instructrl` entry-point group, listed with its package, used in a
smoke RL run; a second package whose name clashes with a built-in is reported naming both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from instructrl.core.errors import PluginError
from instructrl.core.registry import make_registry

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "instructrl-example-plugin"


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


@pytest.fixture(scope="module")
def example_target(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    pip_install_target(EXAMPLE, target)
    return target


def cli(target: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "INSTRUCTRL_DISABLE_PLUGIN_AUTOLOAD"}
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "instructrl.core.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_installed_plugin_is_listed_with_its_package(example_target):
    proc = cli(example_target, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = {(r["kind"], r["name"]): r for r in json.loads(proc.stdout)}
    assert rows[("kl_estimator", "k3_clamped")]["package"] == "instructrl-example-plugin"
    assert rows[("advantage", "batch_mean")]["package"] == "instructrl-example-plugin"
    assert rows[("kl_estimator", "k1")]["package"] == "instructrl"


def test_autoload_off_hides_it(example_target):
    env_proc = subprocess.run(
        [sys.executable, "-m", "instructrl.core.cli", "plugins", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(example_target), "INSTRUCTRL_DISABLE_PLUGIN_AUTOLOAD": "1"},
    )
    names = {r["name"] for r in json.loads(env_proc.stdout)}
    assert "k3_clamped" not in names and "k1" in names


def test_example_package_own_tests_pass(example_target):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(example_target)},
        cwd=str(EXAMPLE),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 passed" in proc.stdout


def test_smoke_rl_run_uses_both_components(example_target, smoke_pipeline, tmp_path, monkeypatch):
    from instructrl.core.config import load_recipe
    from instructrl.core.runner import run_recipe

    monkeypatch.syspath_prepend(str(example_target))
    reg = make_registry(autoload=True)
    recipe = load_recipe(
        "ppo",
        ["kl.estimator=k3_clamped", "kl.max_value=5", "advantage.name=batch_mean"],
        smoke=True,
        registry=reg,
    )
    assert recipe.choice("kl.estimator").config.max_value == 5.0
    summary = run_recipe(recipe, tmp_path / "run", log=lambda *a: None)
    assert summary["run/status"] == "completed"
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "estimator: k3_clamped" in config and "name: batch_mean" in config
    # the k3 estimate is non-negative by construction, so the logged KL is too
    assert summary["rl/kl/value"] >= 0.0


CLASH_PLUGIN = """
from instructrl.core.hookspecs import hookimpl

@hookimpl
def register_kl_estimators(register):
    register("k1", lambda config, ctx: None, description="a second k1")
"""


def test_name_clash_with_a_builtin_names_both_packages(tmp_path, monkeypatch):
    src = tmp_path / "clash"
    (src / "clash_plugin").mkdir(parents=True)
    (src / "clash_plugin" / "__init__.py").write_text(textwrap.dedent(CLASH_PLUGIN))
    (src / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools>=61"]
            build-backend = "setuptools.build_meta"
            [project]
            name = "clashing-kl"
            version = "0.0.1"
            [project.entry-points.instructrl]
            clash = "clash_plugin"
            [tool.setuptools]
            packages = ["clash_plugin"]
            """
        )
    )
    target = tmp_path / "site"
    pip_install_target(src, target)
    monkeypatch.syspath_prepend(str(target))
    with pytest.raises(PluginError) as err:
        make_registry(autoload=True)
    msg = str(err.value)
    assert "kl_estimator 'k1' is registered twice" in msg
    assert "package 'instructrl'" in msg and "package 'clashing-kl'" in msg
    proc = cli(target, "plugins")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "clashing-kl" in proc.stderr


BROKEN_PLUGIN = "import a_module_that_does_not_exist\n"


def test_plugin_that_fails_to_import_exits_2_naming_it(tmp_path):
    src = tmp_path / "broken"
    (src / "broken_plugin").mkdir(parents=True)
    (src / "broken_plugin" / "__init__.py").write_text(BROKEN_PLUGIN)
    (src / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "broken-plugin"\nversion = "0.0.1"\n'
        '[project.entry-points.instructrl]\nbroken = "broken_plugin"\n'
        '[tool.setuptools]\npackages = ["broken_plugin"]\n'
    )
    target = tmp_path / "site"
    pip_install_target(src, target)
    proc = cli(target, "run", "ppo", "--dry-run")
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "plugin 'broken' from package 'broken-plugin' failed to import" in line
    assert "a_module_that_does_not_exist" in line
