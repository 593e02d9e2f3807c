"""Shared fixtures. Third-party plugin discovery is off in tests; built-ins always load.

The stage cache of the whole session lives in one temporary directory, so the tiny smoke
pretrain/SFT/RM models are built once and every RL smoke run reuses them.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("INSTRUCTRL_DISABLE_PLUGIN_AUTOLOAD", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_CACHE = tempfile.mkdtemp(prefix="instructrl-test-cache-")
os.environ["INSTRUCTRL_CACHE_DIR"] = _CACHE

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def registry():
    """The registry of built-in plugins (a fresh one per test)."""
    from instructrl.core.registry import make_registry

    return make_registry(autoload=False)


@pytest.fixture(scope="session")
def cache_dir() -> str:
    """The session's stage cache."""
    return _CACHE


def _run_smoke(run_dir, recipe: str = "ppo", overrides=(), **kwargs):
    """Run a recipe under --smoke in this process; return its summary."""
    from instructrl.core.api import run
    from instructrl.core.cli import quiet_libraries

    quiet_libraries()
    return run(recipe, list(overrides), run_dir=run_dir, smoke=True, log=lambda *a: None, **kwargs)


@pytest.fixture(scope="session")
def run_smoke():
    """``run_smoke(run_dir, recipe="ppo", overrides=(), **options) -> summary`` (in-process)."""
    return _run_smoke


@pytest.fixture(scope="session")
def smoke_pipeline(tmp_path_factory):
    """One full smoke pipeline (pretrain → SFT → RM → RL → eval): its run dir and summary."""
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    summary = _run_smoke(run_dir, "instructgpt")
    return run_dir, summary
