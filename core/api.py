"""The Python API: the same entry points as the command line, without a subprocess.

>>> import instructrl
>>> summary = instructrl.run("ppo", ["kl.coef=0.05"], smoke=True, run_dir="runs/try")
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import Recipe, load_recipe
from .runner import check_paths, default_run_dir, make_plan, run_recipe


def run(
    recipe: str | os.PathLike[str],
    overrides: list[str] | tuple[str, ...] = (),
    *,
    run_dir: str | os.PathLike[str] | None = None,
    smoke: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    use_cache: bool = True,
    argv: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run a recipe (bundled name or path) with ``key=value`` overrides; return ``summary.json``.

    Raises :class:`~instructrl.core.errors.UserInputError` for bad input (nothing is written) and
    :class:`~instructrl.core.errors.RunFailure` when a stage fails.
    """
    r = load_recipe(recipe, list(overrides), smoke=smoke)
    target = Path(run_dir) if run_dir is not None else default_run_dir(str(recipe))
    return run_recipe(r, target, resume=resume, overwrite=overwrite, use_cache=use_cache, argv=argv, log=log)


def dry_run(
    recipe: str | os.PathLike[str],
    overrides: list[str] | tuple[str, ...] = (),
    *,
    smoke: bool = False,
    run_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> dict[str, Any]:
    """Resolve and validate everything a run would use, write nothing; return what would happen."""
    r = load_recipe(recipe, list(overrides), smoke=smoke)
    target = Path(run_dir) if run_dir is not None else default_run_dir(str(recipe))
    return describe(r, target, use_cache=use_cache)


def describe(recipe: Recipe, run_dir: Path, *, use_cache: bool = True) -> dict[str, Any]:
    """The resolved config, the stage plan, derived quantities per stage, and the path checks."""
    plan = make_plan(recipe, run_dir, use_cache=use_cache)
    paths = check_paths(recipe, plan)
    impls = recipe.registry.stages()
    return {
        "config": recipe.plain(),
        "run_dir": str(run_dir),
        "plan": [
            {
                "stage": s.name,
                "status": s.status,
                "dir": str(s.dir) if s.dir else None,
                "in_recipe": s.in_recipe,
                "note": s.note,
            }
            for s in plan
        ],
        "derived": {
            "components": dataclasses.asdict(recipe.derived),
            **{s.name: impls[s.name].describe(recipe) for s in plan},
        },
        "paths": paths,
        "ignored_keys": recipe.ignored,
        "extra_losses": [c.name for c in recipe.extra_losses],
    }
