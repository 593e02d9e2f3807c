"""Running a recipe: plan the stages (with their upstream dependencies), reuse cached stage outputs,
write the run directory, run each stage, and collect ``summary.json``.

Run directory::

    RUN/config.yaml      resolved recipe + provenance (seed, versions, git commit, command)
    RUN/summary.json     final metrics, flat keys (``rm/accuracy``, ``eval/win_rate_vs_sft`` …)
    RUN/<stage>/         metrics.csv (Lightning CSVLogger), checkpoints/, model/, samples/ …

Cacheable stages (pretrain, sft, rm) are built in the stage cache under a key that hashes their
resolved upstream config and the package version; ``RUN/<stage>`` links to the cache entry. Runs
that need the same entry at the same time build it once (a file lock).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock
from omegaconf import OmegaConf

from .config import STAGE_NAMES, Recipe, stable_hash
from .errors import ConfigError, InstructrlError, RunFailure
from .models import require_model_dir
from .stages.common import StageContext, is_global_zero, write_json

CACHE_ENV = "INSTRUCTRL_CACHE_DIR"
COMPLETE = "complete.json"
# Trainer keys that do not change what a stage produces (left out of cache keys).
COSMETIC_TRAINER_KEYS = {
    "enable_progress_bar",
    "enable_model_summary",
    "log_every_n_steps",
    "profiler",
    "barebones",
}


def stages() -> dict[str, Any]:
    """The stage implementations, by name, in pipeline order."""
    from .stages.evaluate import EvalStage
    from .stages.lm import PretrainStage, SFTStage
    from .stages.rl import RLStage
    from .stages.rm import RMStage

    return {s.name: s for s in (PretrainStage(), SFTStage(), RMStage(), RLStage(), EvalStage())}


def _refs(value: Any) -> Iterator[str]:
    """Every ``@stage`` string inside a (nested) config value."""
    if isinstance(value, str):
        if value.startswith("@"):
            yield value[1:]
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _refs(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _refs(v)


def stage_inputs(recipe: Recipe, stage: str) -> dict[str, Any]:
    """The recipe blocks a stage reads model paths from: ``{recipe key: value}``."""
    cfg = recipe.plain()
    if stage == "pretrain":
        return {}
    if stage == "sft":
        return {"sft.model": recipe.section("sft").model}
    if stage == "rm":
        return {"rm.model": recipe.section("rm").model}
    needs_values = _needs_values(recipe)
    inputs = {"policy": cfg["policy"], "reward": cfg["reward"]}
    if needs_values:
        inputs["value"] = cfg["value"]
    for c in recipe.extra_losses:
        inputs[c.name] = cfg[c.name]
    if stage == "eval":
        inputs["rl"] = "@rl"
    return inputs


def _needs_values(recipe: Recipe) -> bool:
    from .registry import BuildContext

    adv = recipe.choice("advantage")
    est = recipe.registry.build("advantage", adv.name, adv.config, BuildContext(registry=recipe.registry))
    return bool(est.needs_values)


def dependencies(recipe: Recipe, stage: str) -> list[str]:
    """Stages whose outputs ``stage`` reads (directly)."""
    deps = []
    for key, value in stage_inputs(recipe, stage).items():
        for ref in _refs(value):
            if ref not in STAGE_NAMES:
                raise ConfigError(f"{key}: '@{ref}' is not a stage (stages: {', '.join(STAGE_NAMES)})")
            if STAGE_NAMES.index(ref) >= STAGE_NAMES.index(stage):
                raise ConfigError(f"{key}: '@{ref}' is produced after the {stage} stage that reads it")
            deps.append(ref)
    return sorted(set(deps), key=STAGE_NAMES.index)


@dataclass
class StagePlan:
    """How one stage will be obtained in a run."""

    name: str
    status: str  # "run" | "cached" | "skipped"
    dir: Path | None  # where the stage writes or was written
    key: str | None = None  # cache key
    output: str | None = None  # the model dir other stages read
    in_recipe: bool = True  # listed in `stages` (vs pulled in as a dependency)
    note: str = ""


@dataclass
class Plan:
    """The ordered stages of a run."""

    stages: list[StagePlan] = field(default_factory=list)

    def by_name(self) -> dict[str, StagePlan]:
        return {s.name: s for s in self.stages}


def cache_root(recipe: Recipe) -> Path:
    """The stage cache: ``cache_dir`` key, else ``$INSTRUCTRL_CACHE_DIR``, else ``~/.cache/instructrl``."""
    configured = recipe.cfg.get("cache_dir")
    if configured:
        return Path(str(configured)).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "instructrl"


def make_plan(recipe: Recipe, run_dir: Path, *, use_cache: bool = True) -> Plan:
    """Resolve which stages run, which come from the cache, and every stage's input paths."""
    from instructrl import __version__

    impls = stages()
    wanted = set(recipe.stages)
    closure: set[str] = set()
    todo = list(recipe.stages)
    while todo:
        s = todo.pop()
        if s in closure:
            continue
        closure.add(s)
        todo += dependencies(recipe, s)
    plan = Plan()
    keys: dict[str, str] = {}
    cfg = recipe.plain()
    root = cache_root(recipe)
    for name in STAGE_NAMES:
        if name not in closure:
            continue
        impl = impls[name]
        if name == "pretrain" and recipe.section("base").model:
            path = str(recipe.section("base").model)
            plan.stages.append(
                StagePlan(
                    name,
                    "skipped",
                    None,
                    output=path,
                    in_recipe=name in wanted,
                    note=f"base.model is set: {path}",
                )
            )
            keys[name] = f"path:{os.path.abspath(path)}"
            continue
        inputs = {}
        for key, value in stage_inputs(recipe, name).items():
            inputs[key] = _fingerprint(value, keys)
        if impl.cacheable and use_cache:
            sections = {sec: _hashable_section(cfg, sec) for sec in impl.reads}
            key = stable_hash({"stage": name, "version": __version__, "config": sections, "inputs": inputs})
            keys[name] = key
            entry = root / f"{name}-{key}"
            done = (entry / COMPLETE).is_file()
            plan.stages.append(
                StagePlan(name, "cached" if done else "run", entry, key, str(entry / "model"), name in wanted)
            )
        else:
            keys[name] = stable_hash({"stage": name, "run": str(run_dir), "inputs": inputs})
            d = run_dir / name
            plan.stages.append(StagePlan(name, "run", d, None, str(d / "model"), True))
    return plan


def _hashable_section(cfg: Mapping[str, Any], section: str) -> Any:
    value = cfg.get(section)
    if section == "trainer" and isinstance(value, Mapping):
        return {k: v for k, v in value.items() if k not in COSMETIC_TRAINER_KEYS}
    return value


def _fingerprint(value: Any, keys: Mapping[str, str]) -> Any:
    """Replace ``@stage`` references by that stage's cache key and paths by absolute paths."""
    if isinstance(value, str):
        if value.startswith("@"):
            return f"@{value[1:]}:{keys.get(value[1:], '?')}"
        if os.path.exists(value):
            return os.path.abspath(value)
        return value
    if isinstance(value, Mapping):
        return {k: _fingerprint(v, keys) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_fingerprint(v, keys) for v in value]
    return value


def check_paths(recipe: Recipe, plan: Plan) -> list[dict[str, str]]:
    """Every model path a stage reads: exists now, or will be produced by a planned stage."""
    produced = {s.name for s in plan.stages}
    report = []
    for sp in plan.stages:
        for key, value in stage_inputs(recipe, sp.name).items():
            for k, v in _paths_in(key, value):
                if v.startswith("@"):
                    ref = v[1:]
                    if ref not in produced:
                        raise ConfigError(f"{k}: '{v}' is not produced by this run")
                    src = plan.by_name()[ref]
                    state = {"cached": "cached", "skipped": "given", "run": "to be produced"}[src.status]
                    report.append({"key": k, "value": v, "status": state, "path": src.output or ""})
                else:
                    require_model_dir(v, k)
                    report.append({"key": k, "value": v, "status": "exists", "path": os.path.abspath(v)})
    if recipe.section("base").model:
        require_model_dir(recipe.section("base").model, "base.model")
    return report


def _paths_in(key: str, value: Any) -> Iterator[tuple[str, str]]:
    """``(recipe key, value)`` of every model-path field in a block (``model``/``ref_model`` or refs)."""
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            if k in ("model", "ref_model") and isinstance(v, str):
                yield f"{key}.{k}", v
            elif isinstance(v, (Mapping, list)):
                yield from _paths_in(f"{key}.{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths_in(f"{key}[{i}]", v)


def git_commit() -> str | None:
    """The git commit of the source checkout this package runs from, if any."""
    here = Path(__file__).resolve().parent.parent
    if not (here / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def provenance(recipe: Recipe, argv: list[str] | None) -> dict[str, Any]:
    """Versions, seed, commit and command line recorded in ``config.yaml``."""
    import lightning
    import torch
    import transformers
    from instructrl import __version__

    return {
        "instructrl": __version__,
        "torch": str(torch.__version__),
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "seed": recipe.seed,
        "recipe": str(recipe.cfg.get("extends")),
        "command": " ".join(argv) if argv else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Create the run dir; a non-empty existing dir needs ``resume`` or ``overwrite``."""
    if not is_global_zero():
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir: {run_dir} exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if overwrite:
            shutil.rmtree(run_dir)
        elif not resume:
            raise ConfigError(
                f"--run-dir: {run_dir} exists and is not empty; pass --resume to continue it or --overwrite to replace it"
            )
    run_dir.mkdir(parents=True, exist_ok=True)


def write_config(run_dir: Path, recipe: Recipe, argv: list[str] | None) -> None:
    """``config.yaml``: the resolved recipe (loadable as a recipe) plus provenance."""
    if not is_global_zero():
        return
    data = recipe.plain()
    data["extends"] = None
    data["provenance"] = provenance(recipe, argv)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(data)))


def _link(run_dir: Path, name: str, target: Path) -> None:
    if not is_global_zero():
        return
    link = run_dir / name
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    link.symlink_to(target, target_is_directory=True)


def execute(
    recipe: Recipe,
    run_dir: Path,
    *,
    resume: bool = False,
    use_cache: bool = True,
    argv: list[str] | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Run the plan; returns the flat summary (also written to ``summary.json``)."""
    impls = stages()
    start = time.perf_counter()
    summary: dict[str, Any] = {"run/status": "running", "run/seed": recipe.seed}
    paths: dict[str, str] = {}
    run_name = run_dir.name
    summary_path = run_dir / "summary.json"
    if resume and summary_path.is_file():
        import json

        previous = json.loads(summary_path.read_text())
        summary.update({k: v for k, v in previous.items() if not k.startswith("run/")})
    # Stages are planned one at a time: a stage built by a concurrent run becomes a cache hit.
    for name in [s.name for s in make_plan(recipe, run_dir, use_cache=use_cache).stages]:
        sp = make_plan(recipe, run_dir, use_cache=use_cache).by_name()[name]
        t0 = time.perf_counter()
        if sp.status == "skipped":
            log(f"[{name}] skipped: {sp.note}")
            paths[name] = str(sp.output)
            continue
        assert sp.dir is not None
        ctx = StageContext(recipe, name, sp.dir, dict(paths), resume=resume, run_name=run_name)
        ran = True
        if sp.key is not None:  # cacheable: build under a lock unless complete
            ran = sp.status == "run"
            result = _cached_stage(impls[name], ctx, sp, log)
            _link(run_dir, name, sp.dir)
        else:
            done = sp.dir / COMPLETE
            if resume and done.is_file():
                ran = False
                log(f"[{name}] already complete in {sp.dir}")
                result = _read_json(done)
            else:
                log(f"[{name}] running → {sp.dir}")
                result = run_stage(impls[name], ctx)
                write_json(done, result)
        paths[name] = str(sp.output)
        summary.update(result)
        if f"time/{name}_s" not in summary or ran:
            summary[f"time/{name}_s"] = round(time.perf_counter() - t0, 2)
        summary["time/total_s"] = round(time.perf_counter() - start, 2)
        write_json(summary_path, summary)
    summary["run/status"] = "completed"
    summary["time/total_s"] = round(time.perf_counter() - start, 2)
    write_json(summary_path, summary)
    return summary


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text())


def run_stage(impl: Any, ctx: StageContext) -> dict[str, Any]:
    """Run one stage; an unexpected exception becomes a RunFailure naming the stage."""
    try:
        return impl.run(ctx)
    except (InstructrlError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise RunFailure(
            f"{ctx.name} stage failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


def _cached_stage(impl: Any, ctx: StageContext, sp: StagePlan, log: Any) -> dict[str, Any]:
    entry = sp.dir
    assert entry is not None
    done = entry / COMPLETE
    if done.is_file():
        log(f"[{sp.name}] cached: {entry}")
        return _read_json(done)
    if not is_global_zero():  # rank > 0 follows rank 0, which holds the lock
        return run_stage(impl, ctx)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        if done.is_file():  # another run built it while we waited
            log(f"[{sp.name}] cached (built by a concurrent run): {entry}")
            return _read_json(done)
        if entry.exists():
            shutil.rmtree(entry)  # an unfinished build
        entry.mkdir(parents=True)
        log(f"[{sp.name}] running → {entry}")
        try:
            result = run_stage(impl, ctx)
        except BaseException:
            shutil.rmtree(entry, ignore_errors=True)
            raise
        write_json(done, result)
        return result


def run_recipe(
    recipe: Recipe,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    use_cache: bool = True,
    argv: list[str] | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Prepare the run dir, write ``config.yaml``, execute; failures are recorded in ``summary.json``."""
    plan = make_plan(recipe, run_dir, use_cache=use_cache)
    check_paths(recipe, plan)
    prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    write_config(run_dir, recipe, argv)
    try:
        return execute(recipe, run_dir, resume=resume, use_cache=use_cache, argv=argv, log=log)
    except KeyboardInterrupt:
        _mark(run_dir, "interrupted", "interrupted")
        raise
    except InstructrlError as exc:
        _mark(run_dir, "failed", str(exc))
        raise
    except Exception as exc:
        _mark(run_dir, "failed", f"{type(exc).__name__}: {exc}")
        raise RunFailure(f"run failed: {type(exc).__name__}: {exc}") from exc


def _mark(run_dir: Path, status: str, error: str) -> None:
    path = run_dir / "summary.json"
    data = _read_json(path) if path.is_file() else {}
    data["run/status"] = status
    data["run/error"] = error.splitlines()[0] if error else error
    write_json(path, data)


def default_run_dir(recipe_name: str) -> Path:
    """``runs/<recipe>-<YYYYmmdd-HHMMSS>`` in the current directory."""
    stem = Path(recipe_name).stem if os.sep in recipe_name or recipe_name.endswith(".yaml") else recipe_name
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def python_command() -> list[str]:
    """How to re-run this launcher as a subprocess."""
    return [sys.executable, "-m", "instructrl.core.cli"]
