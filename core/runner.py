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

import dataclasses
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from omegaconf import OmegaConf

from . import faults
from .config import Recipe, stable_hash
from .errors import ConfigError, InstructrlError, RunFailure, one_of
from .fields import model_path_fields
from .io import atomic_write, clean_stale_temps, is_global_zero, read_json, require_model_dir, write_json
from .protocols import Stage
from .training import CHECKPOINT_SUBDIR, LAST_CHECKPOINT, MODEL_SUBDIR, Interrupted, StageContext, check_stop

CACHE_ENV = "INSTRUCTRL_CACHE_DIR"
COMPLETE = "complete.json"


def _refs(value: object) -> Iterator[str]:
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


def dependencies(recipe: Recipe, stage: str) -> list[str]:
    """Stages whose outputs ``stage`` reads (directly): the ``@stage`` strings in its inputs."""
    impls = recipe.registry.stages()
    deps: list[str] = []
    for key, value in impls[stage].inputs(recipe).items():
        for ref in _refs(value):
            if ref not in impls:
                raise ConfigError(f"{key}: '@{ref}' is not a stage (stages: {one_of(impls)})")
            if ref == stage:
                raise ConfigError(f"{key}: the {stage} stage cannot read its own output '@{ref}'")
            if ref not in deps:
                deps.append(ref)
    return deps


def stage_order(recipe: Recipe) -> list[str]:
    """The recipe's stages and their dependencies, every stage after the stages it reads.

    A listed stage placed before a listed stage it reads is an error, and so is reading a stage
    that is not cached (its output exists only inside a run) without listing it.
    """
    impls = recipe.registry.stages()
    listed = recipe.stages
    order: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ConfigError(f"stages: '{name}' depends on itself ({' → '.join([*visiting, name])})")
        visiting.append(name)
        for dep in dependencies(recipe, name):
            if dep in listed and name in listed and listed.index(dep) > listed.index(name):
                raise ConfigError(
                    f"stages: '{name}' reads the output of '{dep}', so '{dep}' must come first (got {', '.join(listed)})"
                )
            if dep not in listed and impls[dep].cache_key(recipe) is None and impls[dep].skip(recipe) is None:
                raise ConfigError(
                    f"stages: '{name}' reads '@{dep}', which is not cached; list '{dep}' before '{name}'"
                )
            visit(dep)
        visiting.pop()
        order.append(name)

    for name in listed:
        visit(name)
    return order


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


def cache_root(recipe: Recipe) -> Path:
    """The stage cache: ``cache_dir`` key, else ``$INSTRUCTRL_CACHE_DIR``, else ``~/.cache/instructrl``."""
    configured = recipe.cfg.get("cache_dir")
    if configured:
        return Path(str(configured)).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "instructrl"


def make_plan(recipe: Recipe, run_dir: Path, *, use_cache: bool = True) -> list[StagePlan]:
    """Resolve which stages run, which come from the cache, and every stage's output path."""
    from instructrl import __version__

    impls = recipe.registry.stages()
    plan: list[StagePlan] = []
    keys: dict[str, str] = {}
    root = cache_root(recipe)
    for name in stage_order(recipe):
        impl = impls[name]
        impl.check(recipe)
        listed = name in recipe.stages
        skipped = impl.skip(recipe)
        if skipped is not None:
            reason, output = skipped
            plan.append(StagePlan(name, "skipped", None, output=output, in_recipe=listed, note=reason))
            keys[name] = f"path:{os.path.abspath(output)}"
            continue
        inputs = {key: _fingerprint(value, keys) for key, value in impl.inputs(recipe).items()}
        content = impl.cache_key(recipe) if use_cache else None
        if content is not None:
            key = stable_hash({"stage": name, "version": __version__, "config": content, "inputs": inputs})
            keys[name] = key
            entry = root / f"{name}-{key}"
            done = (entry / COMPLETE).is_file()
            plan.append(
                StagePlan(name, "cached" if done else "run", entry, key, str(entry / MODEL_SUBDIR), listed)
            )
        else:
            keys[name] = stable_hash({"stage": name, "run": str(run_dir), "inputs": inputs})
            d = run_dir / name
            plan.append(StagePlan(name, "run", d, None, str(d / MODEL_SUBDIR), True))
    return plan


def _fingerprint(value: object, keys: Mapping[str, str]) -> object:
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


def check_paths(recipe: Recipe, plan: list[StagePlan]) -> list[dict[str, str]]:
    """Every model path a stage reads: exists now, or will be produced by a planned stage.

    The paths are the string inputs of each stage and the fields its selected components mark
    with ``model_path`` in their config dataclasses.
    """
    produced = {s.name: s for s in plan}
    impls = recipe.registry.stages()
    report = []
    for sp in plan:
        if sp.status == "skipped":
            require_model_dir(str(sp.output), sp.note.split(":")[0] or sp.name)
            continue
        for key, value in model_paths(recipe, impls[sp.name].inputs(recipe)):
            if value.startswith("@"):
                src = produced.get(value[1:])
                if src is None:
                    raise ConfigError(f"{key}: '{value}' is not produced by this run")
                state = {"cached": "cached", "skipped": "given", "run": "to be produced"}[src.status]
                report.append({"key": key, "value": value, "status": state, "path": src.output or ""})
            else:
                require_model_dir(value, key)
                report.append(
                    {"key": key, "value": value, "status": "exists", "path": os.path.abspath(value)}
                )
    return report


def model_paths(recipe: Recipe, inputs: Mapping[str, object]) -> Iterator[tuple[str, str]]:
    """``(recipe key, value)`` of each model path in ``inputs`` (``{recipe key: value}``): string
    values, and the ``model_path`` fields of the selected components whose blocks are given."""
    by_path = {c.path: c for c in [*recipe.choices.values(), *recipe.extra_losses]}
    for key, value in inputs.items():
        if isinstance(value, str):
            yield key, value
        elif key in by_path and by_path[key].config is not None:
            conf = by_path[key].config
            for name in model_path_fields(type(conf)):
                v = getattr(conf, name)
                if isinstance(v, str):
                    yield f"{key}.{name}", v


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

    from .precision import cpu_description

    return {
        "instructrl": __version__,
        "torch": str(torch.__version__),
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "cpu": cpu_description(),
        "git_commit": git_commit(),
        "seed": recipe.seed,
        "recipe": str(recipe.cfg.get("extends")),
        "command": " ".join(argv) if argv else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


LOCK_FILE = ".instructrl.lock"
CONFIG_FILE = "config.yaml"
SAFE_RESUME_KEYS = ("loggers", "trainer.enable_progress_bar", "trainer.enable_model_summary", "description")
"""Core keys a ``--resume`` may change; with the stage-section keys marked ``param(resume_safe=True)``
(``rl.iterations`` extends a run) they are all (:func:`resume_safe_keys`); any other difference is refused."""
_RUN_RECORDS = ("provenance", "resume_history")


def _contents(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.iterdir() if p.name != LOCK_FILE] if run_dir.is_dir() else []


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Check the run dir (read only; ``--dry-run`` too): a file is not a run dir, and a non-empty dir
    needs ``resume`` or ``overwrite``. Only the process that writes the run dir checks (DDP workers
    re-run the command after rank 0 wrote it)."""
    if not is_global_zero():
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir: {run_dir} exists and is not a directory")
    if _contents(run_dir) and not (resume or overwrite):
        raise ConfigError(
            f"--run-dir: {run_dir} exists and is not empty; pass --resume to continue it or --overwrite to replace it"
        )


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def resume_safe_keys(recipe: Recipe) -> list[str]:
    """:data:`SAFE_RESUME_KEYS` and every stage-section key marked ``resume_safe``."""
    marked = [
        f"{section}.{f.name}"
        for impl in recipe.registry.stages().values()
        for section, cls in impl.sections.items()
        for f in dataclasses.fields(cls)
        if f.metadata.get("resume_safe")
    ]
    return [*SAFE_RESUME_KEYS, *marked]


def check_resume(run_dir: Path, recipe: Recipe) -> dict[str, list[Any]]:
    """Compare the resolved recipe with the run's ``config.yaml`` before anything is written:
    ``{key: [saved, new]}`` of the differing keys when only :func:`resume_safe_keys` differ; a
    :class:`ConfigError` (exit 2) listing the others, or saying there is nothing to resume."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(
            f"--resume: nothing to resume in {run_dir} (no {CONFIG_FILE}); "
            "start a fresh run without --resume (or pass --overwrite to replace the directory)"
        )
    try:
        saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:
        raise ConfigError(f"--resume: {path} cannot be read ({type(exc).__name__}: {exc})") from None
    assert isinstance(saved, dict)
    new = recipe.plain()
    new["extends"] = None
    for key in _RUN_RECORDS:
        saved.pop(key, None)
        new.pop(key, None)
    old_flat, new_flat = _flat(saved), _flat(new)
    missing = object()
    changed = {
        k: [old_flat.get(k), new_flat.get(k)]
        for k in sorted(set(old_flat) | set(new_flat))
        if old_flat.get(k, missing) != new_flat.get(k, missing)
    }
    safe = resume_safe_keys(recipe)
    refused = [k for k in changed if not any(k == s or k.startswith(s + ".") for s in safe)]
    if refused:
        shown = ", ".join(f"{k} ({changed[k][0]!r} → {changed[k][1]!r})" for k in refused[:12])
        more = f" and {len(refused) - 12} more" if len(refused) > 12 else ""
        raise ConfigError(
            f"--resume: the config differs from {path} in {shown}{more}; a resume may change only "
            f"{', '.join(safe)} (give the run's original recipe and overrides, or start a new --run-dir)"
        )
    return changed


def write_config(
    run_dir: Path, recipe: Recipe, argv: list[str] | None, resumed: dict[str, list[Any]] | None = None
) -> None:
    """``config.yaml``: the resolved recipe (loadable as a recipe) plus provenance; on a resume, the
    first run's provenance is kept and a record is appended to ``resume_history`` (when, the
    command, the safe keys that changed)."""
    if not is_global_zero():
        return
    data = recipe.plain()
    data["extends"] = None
    path = run_dir / CONFIG_FILE
    if resumed is not None and path.is_file():
        saved = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        assert isinstance(saved, dict)
        data["provenance"] = saved.get("provenance") or provenance(recipe, argv)
        history = list(saved.get("resume_history") or [])
        history.append(
            {
                "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "command": " ".join(argv) if argv else None,
                "changed": resumed,
            }
        )
        data["resume_history"] = history
    else:
        data["provenance"] = provenance(recipe, argv)
    atomic_write(path, OmegaConf.to_yaml(OmegaConf.create(data)))


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``RUN/.instructrl.lock`` for the run (creating the run dir); a live run holding it
    already is a :class:`ConfigError` naming it (exit 2). Rank 0 only."""
    if not is_global_zero():
        yield
        return
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(
            f"--run-dir: {run_dir} is in use by another live run (it holds {run_dir / LOCK_FILE}); "
            "wait for it to end, or choose another --run-dir"
        ) from None
    try:
        yield
    finally:
        lock.release()
        if not _contents(run_dir):  # the run wrote nothing (refused, a full disk): leave no trace
            with suppress(OSError):
                (run_dir / LOCK_FILE).unlink()
                if created:
                    run_dir.rmdir()


def _clear(run_dir: Path) -> None:
    """Remove everything in the run dir but the lock (``--overwrite``)."""
    for p in _contents(run_dir):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


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
    log: Callable[[str], None] = print,
    rerun: bool = False,
) -> dict[str, Any]:
    """Run the plan; returns the flat summary (also written to ``summary.json``). On a resume,
    stages recorded complete are kept unless ``rerun`` (a resume that changed safe keys: the run's
    own stages run again from their last checkpoints, e.g. RL on to more iterations). A stop on a
    signal is honoured between stages."""
    impls = recipe.registry.stages()
    start = time.perf_counter()
    summary: dict[str, Any] = {"run/status": "running", "run/seed": recipe.seed}
    paths: dict[str, str] = {}
    run_name = run_dir.name
    summary_path = run_dir / "summary.json"
    if resume and summary_path.is_file():
        previous = read_json(summary_path)
        summary.update({k: v for k, v in previous.items() if not k.startswith("run/")})
    # Stages are planned one at a time: a stage built by a concurrent run becomes a cache hit.
    for name in [s.name for s in make_plan(recipe, run_dir, use_cache=use_cache)]:
        check_stop()
        sp = next(s for s in make_plan(recipe, run_dir, use_cache=use_cache) if s.name == name)
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
            if resume and done.is_file() and not rerun:
                ran = False
                log(f"[{name}] already complete in {sp.dir}")
                result = read_json(done)
            else:
                log(f"[{name}] running → {sp.dir}")
                if is_global_zero() and sp.dir.is_dir():
                    clean_stale_temps(sp.dir)
                result = run_stage(impls[name], ctx)
                faults.kill_point(f"stage:{name}:done")
                write_json(done, result)
        paths[name] = str(sp.output)
        summary.update(result)
        if f"time/{name}_s" not in summary or ran:
            summary[f"time/{name}_s"] = round(time.perf_counter() - t0, 2)
        summary["time/total_s"] = round(time.perf_counter() - start, 2)
        write_json(summary_path, summary)
    summary["run/status"] = "completed"  # (a stop asked for during the last stage: it finished)
    summary["time/total_s"] = round(time.perf_counter() - start, 2)
    write_json(summary_path, summary)
    return summary


def run_stage(impl: Stage, ctx: StageContext) -> dict[str, Any]:
    """Run one stage; an unexpected exception becomes a RunFailure naming the stage (an OSError:
    the path it could not write)."""
    try:
        return impl.run(ctx)
    except (InstructrlError, KeyboardInterrupt):
        raise
    except OSError as exc:
        raise RunFailure(f"{ctx.name} stage failed: {_os_message(exc)}") from exc
    except Exception as exc:
        raise RunFailure(
            f"{ctx.name} stage failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


def _cached_stage(
    impl: Stage, ctx: StageContext, sp: StagePlan, log: Callable[[str], None]
) -> dict[str, Any]:
    entry = sp.dir
    assert entry is not None
    done = entry / COMPLETE
    if done.is_file():
        log(f"[{sp.name}] cached: {entry}")
        return read_json(done)
    if not is_global_zero():  # rank > 0 follows rank 0, which holds the lock
        return run_stage(impl, ctx)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + ".lock"):
        if done.is_file():  # another run built it while we waited
            log(f"[{sp.name}] cached (built by a concurrent run): {entry}")
            return read_json(done)
        # An unfinished build (no complete.json: killed, interrupted): --resume continues it from its
        # checkpoint; otherwise it is rebuilt from scratch.
        if entry.exists() and ctx.resume and (entry / CHECKPOINT_SUBDIR / LAST_CHECKPOINT).is_file():
            clean_stale_temps(entry)
            log(f"[{sp.name}] resuming the unfinished build → {entry}")
        else:
            if entry.exists():
                shutil.rmtree(entry)
            entry.mkdir(parents=True)
            log(f"[{sp.name}] running → {entry}")
        try:
            result = run_stage(impl, ctx)
        except KeyboardInterrupt:
            raise  # stopped after a checkpoint (or at once): kept for --resume, never taken as finished
        except BaseException:
            shutil.rmtree(entry, ignore_errors=True)
            raise
        faults.kill_point(f"stage:{sp.name}:done")
        write_json(done, result)  # last, atomically: the entry is complete only once this exists
        return result


def run_recipe(
    recipe: Recipe,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    use_cache: bool = True,
    argv: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Check the run dir and, on a resume, the config (nothing is written before both pass), take
    the run dir's lock, write ``config.yaml``, execute; failures and interruptions are recorded in
    ``summary.json``. A run dir that cannot be written is a :class:`RunFailure` naming the path."""
    plan = make_plan(recipe, run_dir, use_cache=use_cache)
    check_paths(recipe, plan)
    prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    changed = check_resume(run_dir, recipe) if resume and is_global_zero() else None
    try:
        with run_lock(run_dir):
            if is_global_zero():
                if overwrite:
                    _clear(run_dir)
                clean_stale_temps(run_dir)
            write_config(run_dir, recipe, argv, changed)
            if changed:
                log(f"resume: changed {', '.join(changed)} (recorded in config.yaml resume_history)")
            return _execute_marked(recipe, run_dir, resume, use_cache, argv, log, bool(changed))
    except OSError as exc:
        raise RunFailure(f"run dir {run_dir}: {_os_message(exc)}") from exc


def _execute_marked(
    recipe: Recipe,
    run_dir: Path,
    resume: bool,
    use_cache: bool,
    argv: list[str] | None,
    log: Callable[[str], None],
    rerun: bool,
) -> dict[str, Any]:
    try:
        return execute(recipe, run_dir, resume=resume, use_cache=use_cache, argv=argv, log=log, rerun=rerun)
    except KeyboardInterrupt as exc:
        name = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
        _mark(run_dir, "interrupted", f"interrupted ({name})")
        exc.run_dir = str(run_dir)  # type: ignore[attr-defined]  # the launcher prints the resume command
        raise
    except InstructrlError as exc:
        _mark(run_dir, "failed", str(exc))
        raise
    except OSError as exc:
        _mark(run_dir, "failed", _os_message(exc))
        raise RunFailure(f"run failed: {_os_message(exc)}") from exc
    except Exception as exc:
        _mark(run_dir, "failed", f"{type(exc).__name__}: {exc}")
        raise RunFailure(f"run failed: {type(exc).__name__}: {exc}") from exc


def _os_message(exc: OSError) -> str:
    """``cannot write PATH: No space left on device`` (the path the OSError names)."""
    import errno

    where = f" {exc.filename}" if exc.filename else ""
    unwritable = exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT)
    return f"{'cannot write' if unwritable else 'cannot use'}{where}: {exc.strerror or exc}"


def _mark(run_dir: Path, status: str, error: str) -> None:
    """Record the run's status in ``summary.json`` (best effort: a full disk keeps the last one)."""
    path = run_dir / "summary.json"
    with suppress(OSError, ValueError):
        data = read_json(path) if path.is_file() else {}
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
