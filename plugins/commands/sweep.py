"""Ablation sweeps: a grid of recipe overrides × seeds, run in parallel, resumable, then reported.

    instructrl sweep RECIPE [key=value ...] --grid KEY=V1,V2 [--grid ...] [--zip KEY=V1,V2 ...]
                     [--seeds N | --seeds 0,1,2] [--workers W] [--baseline KEY=V,...]
                     [--metric NAME ...] [--out DIR] [--smoke] [--retry-failed]
                     [--executor local|ray] [--ray-address ADDR] [--dry-run] [--debug]
    instructrl sweep SWEEP.yaml [same options]          # a recipe file with a top-level `sweep:` block

How a sweep goes:

1. **Plan.** Arms are the product of the ``--grid`` axes (first axis slowest) with the ``--zip``
   axes varied together; each arm runs once per seed (``seed=`` override). Every run gets a
   readable directory ``SWEEP/runs/<key=value,...>__seed<N>``.
2. **Validate.** Every arm × seed is resolved and validated (:func:`instructrl.core.api.dry_run`)
   before anything runs; one bad arm is a one-line error naming the arm and the key (exit 2).
3. **Run.** Each run is ``instructrl run RECIPE <overrides> --run-dir SWEEP/runs/NAME`` in its own
   process (a crash fails that run only), ``W`` at a time, with ``cpu_count // W`` torch threads
   each; output goes to ``SWEEP/logs/NAME.log``. Locally a thread pool waits on the processes;
   ``--executor ray`` schedules the same :func:`execute_run` as Ray tasks. Stages shared by the
   arms (pretrain/SFT/RM) come from the stage cache, built once under its file lock.
4. **Record.** ``SWEEP/sweep.json`` holds the arms, seeds and the status (and error line) of every
   run, rewritten after every event. Re-running the same command skips completed runs, resumes
   unfinished ones and leaves failed ones alone unless ``--retry-failed``.
5. **Report.** :func:`instructrl.plugins.commands.report.write_report` writes ``report.md``, ``report.csv``
   and ``plots/``. Exit code 0 when every run completed, 1 when any failed, 130 when interrupted.

Signals: each run is in its own process group; SIGINT or SIGTERM to the sweep is forwarded once
to every running run (as the same signal), which stops at its next safe point with a checkpoint
and is recorded ``interrupted``; re-running the same command resumes it. If the sweep itself is
SIGKILLed, each run gets SIGTERM on Linux (``PR_SET_PDEATHSIG``) and stops the same way; on other
systems the runs keep going to their end (the next sweep skips or resumes them).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from instructrl.core.errors import ConfigError, UserInputError, did_you_mean, one_of
from instructrl.core.hookspecs import hookimpl
from instructrl.core.io import write_json
from instructrl.plugins.commands import report

SWEEP_FILE = report.SWEEP_FILE
# Options whose value is itself ``key=value`` text: the launcher must not take it for an override.
KEY_VALUE_OPTIONS = ("--grid", "--zip", "--baseline")
BLOCK_KEYS = ("grid", "zip", "seeds", "seed_keys", "baseline", "comparisons", "metrics", "curves", "smoke")
KEY = re.compile(r"^[A-Za-z_][\w.\[\]-]*$")
MAX_NAME = 100
EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


class SweepError(ConfigError):
    """A bad sweep: an axis, a seed list, a sweep file, an arm that does not validate. Exit 2."""


class MissingExtra(UserInputError):
    """An optional dependency (``ray``) is not installed. Exit 2."""


# ============================================================================================
# The specification: axes, seeds, a sweep file
# ============================================================================================


@dataclass(frozen=True)
class Axis:
    """One swept key and its values (typed as YAML types them)."""

    key: str
    values: tuple[Any, ...]


@dataclass
class SweepSpec:
    """Everything that defines a sweep (the command line or a sweep file, merged).

    Attributes:
        recipe: the base recipe (bundled name or absolute path).
        overrides: fixed ``key=value`` overrides applied to every run.
        grid: axes combined as a Cartesian product (first axis slowest).
        zipped: axes varied together, element by element (equal lengths).
        seeds: the seeds of every arm; ``None`` means the recipe's own ``seed``.
        seed_keys: further keys set to the run's seed (``pretrain.seed``, ``sft.seed`` …): seeds
            then vary those stages too, and arms share upstream stages only within a seed.
        baseline: the arm differences are reported against (name, ``KEY=V,...`` or a mapping).
        comparisons: named pairs ``{name: {"arm": SPEC, "against": SPEC | "sft"}}`` reported as
            paired differences (``"sft"``: each run's own ``*_sft`` figures).
        metrics: summary metrics to report; ``curves``: RL metrics to plot per iteration.
        smoke: apply the ``--smoke`` overlay to every run.
        source: the sweep file, when there is one.
    """

    recipe: str
    overrides: list[str] = field(default_factory=list)
    grid: list[Axis] = field(default_factory=list)
    zipped: list[Axis] = field(default_factory=list)
    seeds: list[int] | None = None
    seed_keys: list[str] = field(default_factory=list)
    baseline: str | dict[str, Any] | None = None
    comparisons: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=list)
    curves: list[str] | None = None
    smoke: bool = False
    source: str | None = None


def format_value(value: Any) -> str:
    """``value`` as override text that YAML (and OmegaConf) parse back to ``value``."""
    import yaml

    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        return repr(value)
    if isinstance(value, str):
        if value and report.typed_value(value) == value and not value.startswith(("@", "`", "'", '"')):
            return value
        return json.dumps(value)
    if isinstance(value, (list, tuple, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False).strip()
    raise SweepError(f"cannot write {value!r} ({type(value).__name__}) as an override value")


def _check_key(key: str, where: str) -> str:
    key = key.strip()
    if not KEY.match(key):
        raise SweepError(f"{where}: '{key}' is not a recipe key (e.g. kl.estimator)")
    return key


def parse_axis(text: str, flag: str = "--grid") -> Axis:
    """``KEY=V1,V2,...`` → :class:`Axis`; each value typed as YAML types it (``0`` int, ``27.8``
    float, ``k3`` str). A value containing a comma needs the sweep-file form."""
    key, eq, values = text.partition("=")
    if not eq:
        raise SweepError(f"{flag} '{text}': expected KEY=V1,V2,... (e.g. {flag} kl.estimator=k1,k3)")
    key = _check_key(key, f"{flag} '{text}'")
    items = [v.strip() for v in values.split(",")]
    if not values.strip() or any(v == "" for v in items):
        raise SweepError(f"{flag} {key}: empty value in '{values}' (expected V1,V2,...)")
    return Axis(key, tuple(report.typed_value(v) for v in items))


def parse_seeds(text: str | int | Sequence[int]) -> list[int]:
    """``3`` → ``[0, 1, 2]``; ``"0,1,2"`` or ``[0, 1, 2]`` → that list; ``"7,"`` → ``[7]``."""
    if isinstance(text, bool):
        raise SweepError(f"--seeds: expected N or a list of seeds, got {text!r}")
    if isinstance(text, int):
        items, count = [text], True
    elif isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
        count = len(parts) == 1
        items = [p for p in parts if p != ""]
    else:
        items, count = list(text), False
    try:
        seeds = [int(s) for s in items]
    except (TypeError, ValueError):
        raise SweepError(f"--seeds '{text}': expected N (seeds 0..N-1) or a list like 0,1,2") from None
    if count:
        if seeds[0] < 1:
            raise SweepError(f"--seeds {seeds[0]}: the number of seeds must be >= 1")
        return list(range(seeds[0]))
    if not seeds:
        raise SweepError(f"--seeds '{text}': no seeds")
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SweepError(f"--seeds '{text}': seeds must be distinct and >= 0")
    return seeds


def flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings → ``[(dotted key, leaf)]``; lists and scalars are leaves."""
    out: list[tuple[str, Any]] = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out += flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


def is_sweep_file(recipe: str) -> bool:
    """Whether ``recipe`` (a path or a bundled name) is a YAML file with a top-level ``sweep:`` block."""
    path = _sweep_path(recipe)
    if not path.is_file() or path.suffix not in (".yaml", ".yml"):
        return False
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False  # the recipe loader reports it, with the line
    return isinstance(data, dict) and "sweep" in data


def _sweep_path(recipe: str) -> Path:
    """A sweep file's path: the file itself, or the bundled sweep of that name."""
    from instructrl.core.config import bundled_sweeps

    return Path(recipe) if Path(recipe).is_file() else bundled_sweeps().get(recipe, Path(recipe))


def read_sweep_file(path: str | os.PathLike[str]) -> SweepSpec:
    """A sweep file: a recipe (``extends:`` the base, other top-level keys fixed settings) with a
    ``sweep:`` block of ``grid``, ``zip``, ``seeds``, ``baseline``, ``metrics``, ``curves``,
    ``smoke``."""
    from instructrl.core.config import load_yaml
    from omegaconf import OmegaConf

    p = Path(path).resolve()
    data = OmegaConf.to_container(load_yaml(p), resolve=False)
    assert isinstance(data, dict)
    block = data.pop("sweep")
    if not isinstance(block, dict):
        raise SweepError(f"{p}: 'sweep' must be a mapping of {', '.join(BLOCK_KEYS)}")
    for key in block:
        if key not in BLOCK_KEYS:
            raise SweepError(
                f"{p}: sweep.{key}: unknown key{did_you_mean(str(key), BLOCK_KEYS)} (valid: {one_of(BLOCK_KEYS)})"
            )
    base = data.pop("extends", None)
    if not base:
        raise SweepError(f"{p}: a sweep file needs 'extends: RECIPE' (the base recipe, e.g. extends: ppo)")
    data.pop("description", None)
    if "smoke" in data:
        raise SweepError(f"{p}: smoke: a sweep file cannot carry a smoke overlay; use sweep.smoke: true")
    spec = SweepSpec(recipe=_recipe_ref(str(base), p.parent), source=str(p))
    spec.overrides = [f"{k}={format_value(v)}" for k, v in flatten(data)]
    spec.grid = _file_axes(block.get("grid"), "grid", p)
    spec.zipped = _file_axes(block.get("zip"), "zip", p)
    if block.get("seeds") is not None:
        spec.seeds = parse_seeds(block["seeds"])
    spec.seed_keys = [
        _check_key(str(k), f"{p}: sweep.seed_keys") for k in _as_list(block.get("seed_keys"), "seed_keys", p)
    ]
    spec.baseline = block.get("baseline")
    spec.comparisons = _file_comparisons(block.get("comparisons"), p)
    spec.metrics = [str(m) for m in _as_list(block.get("metrics"), "metrics", p)]
    curves = block.get("curves")
    spec.curves = [str(c) for c in _as_list(curves, "curves", p)] if curves is not None else None
    smoke = block.get("smoke", False)
    if not isinstance(smoke, bool):
        raise SweepError(f"{p}: sweep.smoke: expected true or false, got {smoke!r}")
    spec.smoke = smoke
    return spec


def _file_comparisons(block: Any, path: Path) -> dict[str, dict[str, Any]]:
    """``sweep.comparisons``: ``{name: {arm: SPEC, against: SPEC | sft}}`` (SPEC: an arm name or a
    mapping of axis values; matched against the arms when the sweep is planned)."""
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise SweepError(f"{path}: sweep.comparisons: expected a mapping of NAME: {{arm: ..., against: ...}}")
    out = {}
    for name, pair in block.items():
        where = f"{path}: sweep.comparisons.{name}"
        if not isinstance(pair, dict) or set(pair) != {"arm", "against"}:
            raise SweepError(f"{where}: expected exactly the keys arm and against, got {pair!r}")
        out[str(name)] = {"arm": pair["arm"], "against": pair["against"]}
    return out


def _recipe_ref(recipe: str, relative_to: Path | None = None) -> str:
    """A bundled recipe's name as is, a recipe file as an absolute path (runs may start elsewhere)."""
    from instructrl.core.config import bundled_recipes, recipe_path

    path = recipe_path(recipe, relative_to=relative_to)  # a one-line error for an unknown recipe
    return recipe if bundled_recipes().get(recipe) == path else str(path)


def _as_list(value: Any, name: str, path: Path) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SweepError(f"{path}: sweep.{name}: expected a list, got {value!r}")
    return value


def _file_axes(block: Any, name: str, path: Path) -> list[Axis]:
    if block is None:
        return []
    if not isinstance(block, dict):
        raise SweepError(f"{path}: sweep.{name}: expected a mapping of KEY: [V1, V2, ...]")
    axes = []
    for key, values in _axis_leaves(block):
        where = f"{path}: sweep.{name}.{key}"
        _check_key(key, where)
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where}: expected a non-empty list of values, got {values!r}")
        axes.append(Axis(key, tuple(values)))
    return axes


def _axis_leaves(block: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{kl: {estimator: [k1, k3]}}`` and ``{kl.estimator: [k1, k3]}`` alike → ``[(key, values)]``."""
    out = []
    for k, v in block.items():
        if isinstance(v, Mapping):
            out += _axis_leaves(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


# ============================================================================================
# Arms and runs
# ============================================================================================


@dataclass
class Arm:
    """One point of the grid: its values and the overrides that set them."""

    name: str
    values: dict[str, Any]

    @property
    def overrides(self) -> list[str]:
        """``key=value`` for each swept key of this arm."""
        return [f"{k}={format_value(v)}" for k, v in self.values.items()]


@dataclass
class PlannedRun:
    """One arm × seed."""

    name: str
    arm: str
    seed: int
    overrides: list[str]  # everything the run gets, in order

    @property
    def dir(self) -> str:
        """The run directory, relative to the sweep directory."""
        return f"runs/{self.name}"


def sanitize(name: str) -> str:
    """A file-system-safe name: letters, digits and ``._,=+-`` kept, other runs of characters → ``_``."""
    return re.sub(r"[^A-Za-z0-9._,=+-]+", "_", name)


def name_text(value: Any) -> str:
    """A value as it appears in a run name: override text, lists and mappings without brackets
    (``[{name: clip, low: -1}]`` → ``name_clip+low_-1``, ``[]`` → ``empty``)."""
    text = format_value(value)
    if isinstance(value, (list, tuple, dict)):
        text = re.sub(r"[\[\]{}]", "", text).replace(": ", "_").replace(", ", "+") or "empty"
    return text


def _shorten(name: str, values: Mapping[str, Any]) -> str:
    """``name`` cut at an axis boundary to fit :data:`MAX_NAME`, with a hash of the exact values."""
    cut = name[: MAX_NAME - 9]
    if "," in cut:
        cut = cut[: cut.rindex(",")]
    return f"{cut}-{_short_hash(values)}"


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def make_arms(grid: Sequence[Axis], zipped: Sequence[Axis]) -> list[Arm]:
    """The product of the grid axes (first slowest) with the zipped rows; readable unique names."""
    keys = [a.key for a in (*grid, *zipped)]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise SweepError(f"{dupes[0]}: swept twice (each key may be one --grid or --zip axis)")
    if zipped and len({len(a.values) for a in zipped}) > 1:
        lengths = ", ".join(f"{a.key} has {len(a.values)}" for a in zipped)
        raise SweepError(f"--zip: zipped axes need the same number of values ({lengths})")
    rows: list[list[tuple[str, Any]]] = [[]]
    if zipped:
        rows = [[(a.key, a.values[i]) for a in zipped] for i in range(len(zipped[0].values))]
    arms = []
    for combo in itertools.product(*[[(a.key, v) for v in a.values] for a in grid]):
        for row in rows:
            values = dict([*combo, *row])
            arms.append(Arm("", values))
    for arm in arms:
        name = sanitize(",".join(f"{k}={name_text(v)}" for k, v in arm.values.items()) or "base")
        arm.name = name if len(name) <= MAX_NAME else _shorten(name, arm.values)
    counts = [a.name for a in arms]
    for arm in arms:
        if counts.count(arm.name) > 1:
            arm.name = (
                _shorten(arm.name, arm.values)
                if len(arm.name) > MAX_NAME - 9
                else f"{arm.name}-{_short_hash(arm.values)}"
            )
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise SweepError(f"arm '{dup}' appears twice (repeated values on an axis)")
    return arms


def run_name(arm: str, seed: int) -> str:
    """``<arm>__seed<N>``: the run's directory name."""
    return f"{arm}__seed{seed}"


@dataclass
class Plan:
    """A resolved sweep: arms, seeds, runs and where they go."""

    spec: SweepSpec
    out: Path
    arms: list[Arm]
    seeds: list[int]
    runs: list[PlannedRun]
    baseline: str
    command: str
    comparisons: dict[str, dict[str, str]] = field(default_factory=dict)  # name → {arm, against} arm names
    wall: list[float] = field(
        default_factory=lambda: [0.0, 0.0]
    )  # [seconds of earlier sessions, this one's start]

    def meta(self) -> dict[str, Any]:
        """The fixed part of ``sweep.json``."""
        s = self.spec
        return {
            "version": 1,
            "command": self.command,
            "recipe": s.recipe,
            "source": s.source,
            "overrides": s.overrides,
            "smoke": s.smoke,
            "grid": {a.key: list(a.values) for a in s.grid},
            "zip": {a.key: list(a.values) for a in s.zipped},
            "seeds": self.seeds,
            "seed_keys": s.seed_keys,
            "baseline": self.baseline,
            "comparisons": self.comparisons,
            "metrics": s.metrics or list(report.DEFAULT_METRICS),
            "curves": s.curves,
            "arms": [{"name": a.name, "values": a.values} for a in self.arms],
        }


RUN_PREFIX = ["trainer.enable_progress_bar=false"]  # progress bars are noise in a log file


def default_out(spec: SweepSpec) -> Path:
    """``sweeps/<sweep file stem>``, or ``sweeps/<recipe>-<hash of recipe, fixed overrides,
    smoke and axis keys>`` — the same command always lands in the same directory (resume)."""
    if spec.source:
        return Path("sweeps") / Path(spec.source).stem
    ident = [spec.recipe, spec.overrides, spec.smoke, [a.key for a in (*spec.grid, *spec.zipped)]]
    return Path("sweeps") / f"{Path(spec.recipe).stem}-{_short_hash(ident)}"


def plan_sweep(spec: SweepSpec, out: str | os.PathLike[str] | None = None, command: str = "") -> Plan:
    """Arms × seeds → runs (nothing is validated or written yet)."""
    fixed_keys = [o.partition("=")[0] for o in spec.overrides]
    for axis in (*spec.grid, *spec.zipped):
        if axis.key in fixed_keys:
            raise SweepError(f"{axis.key}: both a fixed override and a sweep axis")
        if axis.key == "seed":
            raise SweepError("seed: not a sweep axis; use --seeds N or --seeds 0,1,2")
    seeds = spec.seeds
    if seeds is not None and "seed" in fixed_keys:
        raise SweepError("seed: set both as an override and with --seeds; keep one")
    axis_keys = [a.key for a in (*spec.grid, *spec.zipped)]
    for key in spec.seed_keys:
        if key == "seed" or key in fixed_keys or key in axis_keys:
            raise SweepError(
                f"sweep.seed_keys: {key} is {'always the seed' if key == 'seed' else 'also fixed or swept'}; "
                "a seed key takes each run's seed"
            )
    if seeds is None:
        from instructrl.core.config import compose

        seeds = [int(compose(spec.recipe, spec.overrides, smoke=spec.smoke).seed)]
    arms = make_arms(spec.grid, spec.zipped)
    runs = [
        PlannedRun(
            run_name(a.name, s),
            a.name,
            s,
            [*RUN_PREFIX, *spec.overrides, *a.overrides, f"seed={s}", *(f"{k}={s}" for k in spec.seed_keys)],
        )
        for a in arms
        for s in seeds
    ]
    baseline = arms[0].name
    if spec.baseline not in (None, ""):
        try:
            baseline = report.match_arm([asdict(a) for a in arms], spec.baseline, "--baseline")
        except report.ReportError as exc:
            raise SweepError(str(exc)) from None
    comparisons = {}
    for name, pair in spec.comparisons.items():
        try:
            arm = report.match_arm([asdict(a) for a in arms], pair["arm"], f"sweep.comparisons.{name}.arm")
            other = pair["against"]
            if other != report.SFT:
                other = report.match_arm(
                    [asdict(a) for a in arms], other, f"sweep.comparisons.{name}.against"
                )
        except report.ReportError as exc:
            raise SweepError(str(exc)) from None
        comparisons[name] = {"arm": arm, "against": other}
    return Plan(
        spec, Path(out) if out else default_out(spec), arms, seeds, runs, baseline, command, comparisons
    )


def validate_plan(plan: Plan) -> None:
    """Resolve and validate every arm × seed; the first bad one is a :class:`SweepError` naming the
    arm (and seed) and, through the recipe error, the key."""
    from instructrl.core.api import dry_run

    for run in plan.runs:
        try:
            dry_run(
                plan.spec.recipe, run.overrides, smoke=plan.spec.smoke, run_dir=plan.out.resolve() / run.dir
            )
        except UserInputError as exc:
            raise SweepError(f"arm '{run.arm}' (seed {run.seed}): {exc}") from None


# ============================================================================================
# Running one run (the function every executor schedules)
# ============================================================================================


@dataclass
class RunTask:
    """Everything a worker needs to run one run (picklable; paths absolute)."""

    name: str
    recipe: str
    overrides: list[str]
    run_dir: str
    log: str
    smoke: bool
    mode: str  # "fresh" | "resume" | "overwrite"
    threads: int
    env: dict[str, str]


@dataclass
class RunResult:
    """How a run ended."""

    name: str
    status: str  # completed | failed | interrupted
    error: str | None
    returncode: int | None
    duration_s: float


_LIVE: dict[str, subprocess.Popen[bytes]] = {}
_LIVE_LOCK = threading.Lock()


def run_command(task: RunTask) -> list[str]:
    """The ``instructrl run`` command line of a task."""
    from instructrl.core.runner import python_command

    cmd = [*python_command(), "run", task.recipe, *task.overrides, "--run-dir", task.run_dir, "--debug"]
    if task.smoke:
        cmd.append("--smoke")
    if task.mode == "resume":
        cmd.append("--resume")
    elif task.mode == "overwrite":
        cmd.append("--overwrite")
    return cmd


def execute_run(task: RunTask) -> RunResult:
    """Run one run as an ``instructrl run`` subprocess, wait, and classify how it ended.

    Output (with tracebacks) is appended to ``task.log``. If this call is interrupted (a Ray
    cancellation), the subprocess is interrupted too, so it records itself as interrupted.
    """
    cmd = run_command(task)
    env = {**os.environ, **task.env}
    Path(task.log).parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(task.log, "ab") as log:
        log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        log.flush()
        # Its own process group (a terminal's Ctrl-C reaches the sweep only, which forwards it once:
        # a second signal would make the run stop at once); on Linux it gets SIGTERM if the sweep dies.
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True, preexec_fn=_die_with_parent if _PRCTL is not None else None,
        )  # fmt: skip
        with _LIVE_LOCK:
            _LIVE[task.name] = proc
        try:
            rc = proc.wait()
        except BaseException:
            _stop([proc])
            raise
        finally:
            with _LIVE_LOCK:
                _LIVE.pop(task.name, None)
    return classify(task, rc, time.perf_counter() - start)


def classify(task: RunTask, returncode: int, duration_s: float) -> RunResult:
    """completed (exit 0 and ``run/status: completed``), interrupted (exit 130 / SIGINT) or failed
    with its error line: ``run/error`` from ``summary.json``, else the log's last ``error:`` line,
    else its last line, else the exit code."""
    summary = report._read_json(Path(task.run_dir) / "summary.json")
    status = summary.get("run/status")
    if returncode == 0 and status == "completed":
        return RunResult(task.name, "completed", None, 0, duration_s)
    if returncode in (130, 143, -signal.SIGINT, -signal.SIGTERM) or status == "interrupted":
        return RunResult(task.name, "interrupted", "interrupted", returncode, duration_s)
    error = str(summary.get("run/error") or "") if status == "failed" else ""
    error = error.splitlines()[0] if error.strip() else _error_from_log(Path(task.log), returncode)
    return RunResult(task.name, "failed", error, returncode, duration_s)


def _error_from_log(path: Path, returncode: int) -> str:
    lines: list[str] = []
    try:
        text = path.read_bytes()[-20000:].decode(errors="replace")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    except OSError:
        pass
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: ") :]
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    last = lines[-1] if lines and not lines[-1].startswith("===") else ""
    return f"exit code {returncode}" + (f": {last}" if last else "")


_FORWARD = {"signal": signal.SIGINT}  # the signal the sweep got (SIGTERM is forwarded as SIGTERM)


def _libc_prctl() -> Any:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl() if sys.platform.startswith("linux") else None  # resolved before any fork


def _die_with_parent() -> None:
    """In the forked child (Linux): SIGTERM when the thread that started it dies (a SIGKILLed
    sweep), so the run stops at its next safe point with a checkpoint instead of running on."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _stop(procs: Sequence[subprocess.Popen[bytes]], grace: float = 30.0, sig: int | None = None) -> None:
    """Forward the sweep's signal (SIGINT, or SIGTERM) once to each run's process group (the run
    and, under DDP, its workers): each stops at its next safe point, writes a checkpoint and records
    itself interrupted (exit 130 / 143). Those still alive after ``grace`` s are killed."""
    sig = _FORWARD["signal"] if sig is None else sig
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except OSError:
                try:
                    p.send_signal(sig)
                except OSError:
                    pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ============================================================================================
# Executors
# ============================================================================================


class LocalExecutor:
    """``W`` threads, each waiting on one ``instructrl run`` subprocess at a time."""

    name = "local"

    def __init__(self, workers: int) -> None:
        self.cpus = os.cpu_count() or 1
        self.pool = cf.ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="sweep-run")

    def submit(self, task: RunTask) -> cf.Future[RunResult]:
        """Start :func:`execute_run` on a free thread."""
        return self.pool.submit(execute_run, task)

    def interrupt(self) -> None:
        """Forward the sweep's signal to every running subprocess (each runs in its own process
        group, so a terminal's Ctrl-C reached the sweep only)."""
        with _LIVE_LOCK:
            procs = list(_LIVE.values())
        _stop(procs)

    def shutdown(self) -> None:
        """Wait for the threads."""
        self.pool.shutdown(wait=True)


class RayExecutor:
    """:func:`execute_run` as Ray tasks, on a local Ray instance (``num_cpus`` = workers × threads)
    or the cluster at ``--ray-address`` / ``$RAY_ADDRESS``. Run and cache directories must be on a
    file system every node sees."""

    name = "ray"

    def __init__(self, workers: int | None, address: str | None) -> None:
        try:
            import ray
        except ImportError:
            raise MissingExtra(
                "--executor ray needs the 'ray' package: pip install instructrl[ray]"
            ) from None
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS") or None
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address:
                ray.init(address=address, **options)
            else:
                cpus = os.cpu_count() or 1
                w = workers or cpus
                ray.init(num_cpus=w * max(1, cpus // w), **options)
            self.started = True
        self.cpus = int(ray.cluster_resources().get("CPU", 1))
        self.refs: dict[cf.Future[RunResult], Any] = {}
        self.remote: Any = None

    def configure(self, threads: int) -> None:
        """Each task reserves ``threads`` CPUs (and runs with that many torch threads)."""
        self.remote = self.ray.remote(execute_run).options(num_cpus=threads, max_retries=0)

    def submit(self, task: RunTask) -> cf.Future[RunResult]:
        """Schedule :func:`execute_run` as a Ray task; its result as a ``concurrent.futures`` future."""
        ref = self.remote.remote(task)
        fut = ref.future()
        self.refs[fut] = ref
        return fut

    def interrupt(self) -> None:
        """Cancel unfinished tasks (the task interrupts its subprocess)."""
        for fut, ref in self.refs.items():
            if not fut.done():
                self.ray.cancel(ref)

    def shutdown(self) -> None:
        """Shut down the Ray instance if this executor started it."""
        if self.started:
            self.ray.shutdown()


def make_executor(kind: str, workers: int | None, address: str | None) -> LocalExecutor | RayExecutor:
    """The executor named ``kind`` (``local`` or ``ray``)."""
    if kind == "ray":
        return RayExecutor(workers, address)
    if kind == "local":
        return LocalExecutor(workers or (os.cpu_count() or 1))
    raise SweepError(f"--executor: unknown executor '{kind}' (valid: local or ray)")


# ============================================================================================
# Progress
# ============================================================================================


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Runs done / running / failed and an ETA: one updating line on a terminal, else one line
    per event."""

    def __init__(
        self, total: int, done: int, failed: int, workers: int, stream: TextIO | None = None
    ) -> None:
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total, self.done, self.failed, self.running = total, done, failed, 0
        self.workers = max(1, workers)
        self.durations: list[float] = []

    def eta(self) -> str:
        """Mean duration of the runs finished so far × the work left ÷ workers."""
        if not self.durations:
            return "?"
        left = self.total - self.done - self.failed
        waiting = max(0, left - self.running)
        mean = sum(self.durations) / len(self.durations)
        return _duration(mean * (waiting + 0.5 * self.running) / self.workers)

    def status(self) -> str:
        """The status line."""
        return (
            f"[sweep] {self.done}/{self.total} done · {self.running} running · {self.failed} failed · "
            f"ETA {self.eta()}"
        )

    def _emit(self, message: str | None) -> None:
        if self.tty:
            if message:
                self.stream.write("\r\x1b[K" + message + "\n")
            self.stream.write("\r\x1b[K" + self.status())
        elif message:
            self.stream.write(f"{message}  {self.status()}\n")
        self.stream.flush()

    def started(self, name: str, mode: str) -> None:
        """A run started (``mode``: fresh, resume or overwrite)."""
        self.running += 1
        self._emit(None if self.tty else f"start {name}" + (f" ({mode})" if mode != "fresh" else ""))

    def finished(self, result: RunResult) -> None:
        """A run ended: completed, failed (with its error line) or interrupted."""
        self.running -= 1
        if result.status == "completed":
            self.done += 1
            self.durations.append(result.duration_s)
            self._emit(f"done  {result.name} ({_duration(result.duration_s)})")
        elif result.status == "failed":
            self.failed += 1
            self._emit(f"FAIL  {result.name}: {result.error}")
        else:
            self._emit(f"stop  {result.name} ({result.status})")

    def close(self) -> None:
        """End the updating line."""
        if self.tty:
            self.stream.write("\r\x1b[K" + self.status() + "\n")
            self.stream.flush()


# ============================================================================================
# The sweep directory
# ============================================================================================


def _previous(plan: Plan) -> dict[str, dict[str, Any]]:
    """Run records of an earlier sweep in the same directory (``{}`` when new); a directory made
    by a sweep of another base recipe, fixed overrides or scale is refused."""
    path = plan.out / SWEEP_FILE
    if not path.is_file():
        return {}
    old = report._read_json(path)
    mine = plan.meta()
    for key in ("recipe", "overrides", "smoke", "seed_keys"):
        if old.get(key, [] if key == "seed_keys" else None) != mine[key]:
            raise SweepError(
                f"--out {plan.out}: holds a sweep with another {key} ({old.get(key)!r}, now {mine[key]!r}); "
                "choose another --out"
            )
    runs = {r["name"]: r for r in old.get("runs", [])}
    now = {run.name for run in plan.runs}
    kept, gone = sorted(now & set(runs)), sorted(set(runs) - now)
    if gone or now - set(runs):
        print(
            f"sweep: the spec changed since {path}: keeping {len(kept)} run(s) ({', '.join(kept) or 'none'}); "
            f"new: {', '.join(sorted(now - set(runs))) or 'none'}; no longer in the spec (left on disk, not "
            f"reported): {', '.join(gone) or 'none'}",
            file=sys.stderr,
        )
    return {name: r for name, r in runs.items() if name in now}


def initial_state(plan: Plan, retry_failed: bool) -> list[dict[str, Any]]:
    """Each run's record and what to do with it: ``skip`` (completed, or failed without
    ``--retry-failed``), ``fresh``, ``resume`` (an unfinished run dir) or ``overwrite`` (a retried
    failure: a clean restart)."""
    old = _previous(plan)
    records = []
    for run in plan.runs:
        prev = old.get(run.name, {})
        run_dir = plan.out / run.dir
        summary = report._read_json(run_dir / "summary.json")
        rec = {
            "name": run.name,
            "arm": run.arm,
            "seed": run.seed,
            "dir": run.dir,
            "status": "pending",
            "error": None,
            "duration_s": prev.get("duration_s"),
            "attempts": prev.get("attempts", 0),
        }
        if summary.get("run/status") == "completed":
            rec.update(status="completed", action="skip")
        elif prev.get("status") == "failed" and not retry_failed:
            rec.update(status="failed", error=prev.get("error"), action="skip")
        elif prev.get("status") == "failed":
            rec["action"] = "overwrite"
        elif run_dir.is_dir() and any(run_dir.iterdir()):
            rec["action"] = "resume"
        else:
            rec["action"] = "fresh"
        records.append(rec)
    return records


def _save(plan: Plan, records: Sequence[Mapping[str, Any]]) -> None:
    data = plan.meta()
    data["runs"] = [{k: v for k, v in r.items() if k != "action"} for r in records]
    data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    earlier, start = plan.wall
    data["wall_s"] = round(earlier + (time.time() - start if start else 0.0), 1)  # over every session
    write_json(plan.out / SWEEP_FILE, data)


# ============================================================================================
# The sweep
# ============================================================================================


def run_sweep(
    plan: Plan,
    *,
    workers: int | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    retry_failed: bool = False,
    stream: TextIO | None = None,
) -> int:
    """Run a validated plan; write ``sweep.json`` as it goes and the report at the end.

    Returns the exit code: 0 every run completed, 1 some failed, 130 interrupted (re-run the
    same command to resume).
    """
    from filelock import FileLock, Timeout

    out = stream or sys.stdout
    plan.out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(plan.out / ".sweep.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise SweepError(f"--out {plan.out}: another sweep is running in this directory") from None
    try:
        return _run_locked(plan, workers, executor, ray_address, retry_failed, out)
    finally:
        lock.release()


def _run_locked(
    plan: Plan, workers: int | None, executor: str, ray_address: str | None, retry_failed: bool, out: TextIO
) -> int:
    records = initial_state(plan, retry_failed)
    plan.wall = [float(report._read_json(plan.out / SWEEP_FILE).get("wall_s") or 0.0), time.time()]
    _save(plan, records)
    todo = [r for r in records if r["action"] != "skip"]
    by_name = {r.name: r for r in plan.runs}
    done0 = sum(r["status"] == "completed" for r in records)
    failed0 = sum(r["status"] == "failed" for r in records)
    print(
        f"sweep: {len(plan.arms)} arms × {len(plan.seeds)} seeds = {len(records)} runs → {plan.out}"
        + (f"  ({done0} already completed, {failed0} failed earlier)" if done0 or failed0 else ""),
        file=out,
        flush=True,
    )
    interrupted = False
    if todo:
        ex = make_executor(executor, workers, ray_address)
        try:
            w = max(1, min(len(todo), workers or ex.cpus))
            threads = max(1, ex.cpus // w)
            if isinstance(ex, RayExecutor):
                ex.configure(threads)
            print(f"{len(todo)} to run: {w} at a time, {threads} torch thread(s) each ({ex.name})", file=out)
            progress = Progress(len(records), done0, failed0, w, out)
            interrupted = _loop(plan, todo, by_name, records, ex, w, threads, progress)
            progress.close()
        finally:
            ex.shutdown()
    result = report.write_report(plan.out, plan.spec.metrics or None, plan.baseline, plan.spec.curves)
    print("\n".join(report.summary_lines(result)), file=out)
    failed = [r for r in records if r["status"] == "failed"]
    for r in failed:
        print(
            f"failed: {r['name']}: {r['error']}  (log: {plan.out / 'logs' / (r['name'] + '.log')})", file=out
        )
    if interrupted:
        left = sum(r["status"] != "completed" for r in records)
        print(f"interrupted: {left} runs not completed; re-run the same command to resume", file=out)
        return EXIT_INTERRUPTED
    if failed:
        print(f"{len(failed)} run(s) failed; fix and re-run with --retry-failed", file=out)
        return EXIT_FAILED
    return EXIT_OK


def _task(plan: Plan, run: PlannedRun, action: str, threads: int) -> RunTask:
    env = {k: v for k, v in os.environ.items() if k.startswith("INSTRUCTRL_")}
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = plan.out.resolve()
    return RunTask(
        name=run.name,
        recipe=plan.spec.recipe,
        overrides=run.overrides,
        run_dir=str(root / run.dir),
        log=str(root / "logs" / f"{run.name}.log"),
        smoke=plan.spec.smoke,
        mode=action,
        threads=threads,
        env=env,
    )


def _loop(
    plan: Plan,
    todo: list[dict[str, Any]],
    by_name: Mapping[str, PlannedRun],
    records: list[dict[str, Any]],
    ex: LocalExecutor | RayExecutor,
    workers: int,
    threads: int,
    progress: Progress,
) -> bool:
    """Keep ``workers`` runs in flight until all are done; True when interrupted."""
    queue = list(todo)
    flight: dict[cf.Future[RunResult], dict[str, Any]] = {}
    restore = _sigterm_as_interrupt()
    try:
        while queue or flight:
            while queue and len(flight) < workers:
                rec = queue.pop(0)
                rec.update(status="running", error=None, attempts=rec["attempts"] + 1)
                flight[ex.submit(_task(plan, by_name[rec["name"]], rec["action"], threads))] = rec
                progress.started(rec["name"], rec["action"])
                _save(plan, records)
            finished, _ = cf.wait(list(flight), timeout=1.0, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                rec = flight.pop(fut)
                result = _result(fut, rec["name"])
                rec.update(status=result.status, error=result.error, duration_s=round(result.duration_s, 2))
                _save(plan, records)
                progress.finished(result)
        return False
    except KeyboardInterrupt:
        ex.interrupt()
        for fut, rec in flight.items():
            try:
                result = fut.result(timeout=60)
                status, error = (
                    (result.status, result.error) if result.status == "completed" else ("interrupted", None)
                )
            except BaseException:
                status, error = "interrupted", None
            rec.update(status=status, error=error)
        for rec in queue:
            rec["status"] = "pending"
        _save(plan, records)
        return True
    finally:
        restore()


def _result(fut: cf.Future[RunResult], name: str) -> RunResult:
    """The future's result; an executor-level failure (a Ray worker died) fails that run."""
    try:
        return fut.result()
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        return RunResult(name, "failed", f"{type(exc).__name__}: {lines[-1] if lines else ''}", None, 0.0)


def _sigterm_as_interrupt() -> Callable[[], None]:
    """While sweeping, SIGTERM (``kill``, a scheduler) stops the sweep like Ctrl-C, and is the
    signal forwarded to the runs."""
    _FORWARD["signal"] = signal.SIGINT
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        _FORWARD["signal"] = signal.SIGTERM
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


# ============================================================================================
# The command
# ============================================================================================


def spec_from_args(args: argparse.Namespace) -> SweepSpec:
    """Merge a sweep file (if the recipe is one) with the command line: the command line adds
    axes and fixed overrides and replaces seeds, baseline, metrics."""

    if is_sweep_file(args.recipe):
        spec = read_sweep_file(_sweep_path(args.recipe))
    else:
        spec = SweepSpec(recipe=_recipe_ref(args.recipe))
    spec.overrides = [*spec.overrides, *args.overrides]
    spec.grid = [*spec.grid, *(parse_axis(g, "--grid") for g in args.grid or [])]
    spec.zipped = [*spec.zipped, *(parse_axis(z, "--zip") for z in args.zip or [])]
    if args.seeds is not None:
        spec.seeds = parse_seeds(args.seeds)
    if args.baseline:
        spec.baseline = args.baseline
    if args.metric:
        spec.metrics = list(args.metric)
    spec.smoke = spec.smoke or args.smoke
    return spec


def format_plan(plan: Plan, records: Sequence[Mapping[str, Any]]) -> str:
    """What ``--dry-run`` prints: the arms, every run and what would happen to it."""
    s = plan.spec
    lines = [
        f"sweep of {s.recipe}{' (--smoke)' if s.smoke else ''}: {len(plan.arms)} arms × {len(plan.seeds)} seeds "
        f"= {len(plan.runs)} runs → {plan.out}",
    ]
    if s.overrides:
        lines.append("fixed: " + " ".join(s.overrides))
    lines.append(f"baseline: {plan.baseline}")
    what = {"skip": "", "fresh": "to run", "resume": "to resume", "overwrite": "to retry"}
    for rec in records:
        state = rec["status"] if rec["action"] == "skip" else what[rec["action"]]
        lines.append(f"  {rec['name']:<60} {state}")
    lines.append("valid; nothing was written (--dry-run)")
    return "\n".join(lines)


def cmd_sweep(args: argparse.Namespace) -> int:
    """``instructrl sweep``: plan, validate every run, run, report."""
    if args.workers is not None and args.workers < 1:
        raise SweepError(f"--workers: must be >= 1 (got {args.workers})")
    spec = spec_from_args(args)
    plan = plan_sweep(spec, args.out, _command_line(args))
    validate_plan(plan)
    if args.dry_run:
        records = initial_state(plan, args.retry_failed)
        print(format_plan(plan, records))
        return EXIT_OK
    return run_sweep(
        plan,
        workers=args.workers,
        executor=args.executor,
        ray_address=args.ray_address,
        retry_failed=args.retry_failed,
    )


def _command_line(args: argparse.Namespace) -> str:
    parts = ["instructrl", "sweep", args.recipe, *args.overrides]
    for flag, values in (("--grid", args.grid), ("--zip", args.zip), ("--metric", args.metric)):
        for v in values or []:
            parts += [flag, v]
    for flag, value in (("--seeds", args.seeds), ("--baseline", args.baseline), ("--out", args.out)):
        if value is not None:
            parts += [flag, str(value)]
    if args.smoke:
        parts.append("--smoke")
    return shlex.join(parts)


class SweepCommand:
    """``instructrl sweep``: plan, validate every run, run them in parallel (resumable), report."""

    key_value_options: tuple[str, ...] = KEY_VALUE_OPTIONS

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The ``instructrl sweep`` arguments."""
        parser.add_argument(
            "recipe", help="a recipe (bundled name or path) or a sweep file (YAML with a `sweep:` block)"
        )
        parser.add_argument("overrides", nargs="*", metavar="key=value", help="fixed overrides for every run")
        parser.add_argument(
            "--grid",
            action="append",
            metavar="KEY=V1,V2",
            help="a swept key and its values (repeatable: product)",
        )
        parser.add_argument(
            "--zip", action="append", metavar="KEY=V1,V2", help="keys varied together, element by element"
        )
        parser.add_argument("--seeds", help="N (seeds 0..N-1) or a list 0,1,2 (default: the recipe's seed)")
        parser.add_argument("--workers", type=int, help="runs at a time (default: min(runs, CPU cores))")
        parser.add_argument(
            "--baseline",
            metavar="KEY=V,...",
            help="the arm differences are reported against (default: the first)",
        )
        parser.add_argument(
            "--metric", action="append", metavar="NAME", help="summary metric to report (repeatable)"
        )
        parser.add_argument(
            "--out", help="sweep directory (default: sweeps/<recipe>-<hash>, stable for resume)"
        )
        parser.add_argument("--smoke", action="store_true", help="tiny sizes for every run")
        parser.add_argument(
            "--retry-failed", action="store_true", help="run failed runs again (from scratch)"
        )
        parser.add_argument(
            "--executor", choices=["local", "ray"], default="local", help="where runs execute"
        )
        parser.add_argument(
            "--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="validate every run and print the plan; write nothing"
        )
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    def run(self, args: argparse.Namespace) -> int:
        """Run the sweep; exit code 0 (all completed), 1 (any failed) or 130 (interrupted)."""
        return cmd_sweep(args)


@hookimpl
def register_commands(register: Callable[..., None]) -> None:
    """``instructrl sweep``."""
    register(
        "sweep",
        SweepCommand(),
        description="run a grid of overrides × seeds in parallel, resumable, then report",
    )
