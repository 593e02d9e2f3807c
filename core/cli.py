"""The ``instructrl`` launcher.

    instructrl run RECIPE [key=value ...] [--run-dir DIR] [--dry-run [--json]] [--smoke]
                                          [--resume | --overwrite] [--no-cache] [--debug]
    instructrl eval MODEL_DIR [--against SFT_DIR] [--recipe RECIPE] [key=value ...]
    instructrl plugins [--json]
    instructrl recipes [--json]
    instructrl sweep RECIPE|SWEEP.yaml [key=value ...] --grid KEY=V1,V2 [--seeds N] ...  (command plugin: plugins/commands/)
    instructrl report SWEEP_DIR [--metric NAME ...] [--baseline KEY=V,...]          (command plugin: plugins/commands/)
    instructrl <command> ...   (any command a plugin registers through ``register_commands``)

Exit codes: 0 success · 1 a failure while running (named; an unwritable or full run dir names the
path) · 2 bad input (also: a ``--resume`` that would change the run, nothing to resume, a run dir
locked by a live run) · 130 stopped by SIGINT (Ctrl-C) · 143 stopped by SIGTERM. On either signal
``instructrl run`` finishes the current optimiser step, writes a checkpoint, marks the run
interrupted and prints the ``--resume`` command; a second signal stops at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import InstructrlError, UserInputError

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_TERMINATED = 143  # SIGTERM (128 + 15)
EXIT_CODES_HELP = (
    "exit codes: 0 success, 1 failure while running, 2 bad input (incl. a refused --resume or a locked "
    "run dir), 130 stopped by SIGINT, 143 stopped by SIGTERM (a checkpoint is written first; resume "
    "with --resume)"
)
OVERRIDE = re.compile(r"^[A-Za-z_][\w.\[\]-]*=")


class ArgumentError(UserInputError):
    """A command-line usage error."""


class Parser(argparse.ArgumentParser):
    """argparse that raises (exit code 2 through the one error path) instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ArgumentError(f"{self.prog}: {message}")


def build_parser() -> Parser:
    p = Parser(
        prog="instructrl",
        description="InstructGPT-style RLHF: recipes, plugins, sweeps.",
        epilog=EXIT_CODES_HELP,
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    run = sub.add_parser("run", help="run a recipe (bundled name or path)")
    run.add_argument("recipe")
    run.add_argument("overrides", nargs="*", metavar="key=value", help="OmegaConf dotlist overrides")
    run.add_argument("--run-dir", help="run directory (default: runs/<recipe>-<time>)")
    run.add_argument(
        "--dry-run", action="store_true", help="resolve and validate, print the plan, write nothing"
    )
    run.add_argument(
        "--json", action="store_true", help="machine-readable output (with --dry-run, or the final summary)"
    )
    run.add_argument("--smoke", action="store_true", help="tiny sizes (seconds to a minute on a CPU)")
    run.add_argument(
        "--resume", action="store_true", help="continue a killed run in --run-dir from its checkpoints"
    )
    run.add_argument("--overwrite", action="store_true", help="replace a non-empty --run-dir")
    run.add_argument(
        "--no-cache", action="store_true", help="build every stage in the run dir, bypassing the stage cache"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars or stage lines")
    run.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")

    pl = sub.add_parser("plugins", help="list every registered component")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    rc = sub.add_parser("recipes", help="list the bundled recipes")
    rc.add_argument("--json", action="store_true")
    rc.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    add_plugin_commands(sub)
    return p


def add_plugin_commands(sub: Any) -> None:
    """One sub-parser per registered command (kind ``command``): its arguments, ``--debug``, and
    its ``run`` as the handler."""
    from .registry import get_registry

    reg = get_registry(strict=False)
    for name in reg.names("command"):
        spec = reg.get("command", name)
        cmd = spec.factory  # a command registers its object in the factory slot
        p = sub.add_parser(name, help=spec.description)
        cmd.add_arguments(p)
        if not any("--debug" in a.option_strings for a in p._actions):
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        p.set_defaults(handler=cmd.run)


def key_value_options() -> set[str]:
    """Options whose value is ``KEY=V`` text (not a recipe override): every command's
    ``key_value_options``."""
    from .registry import get_registry

    reg = get_registry(strict=False)
    return {
        opt for name in reg.names("command") for opt in reg.get("command", name).factory.key_value_options
    }


# --------------------------------------------------------------------------------------------


def cmd_plugins(args: argparse.Namespace) -> int:
    """List every registered component by kind, and every broken plugin (still exit 0)."""
    from .registry import KINDS, get_registry

    reg = get_registry(strict=False)
    rows = [s.as_dict() for s in reg.all()]
    broken = [{"plugin": b.plugin, "package": b.package, "error": b.message()} for b in reg.broken]
    if args.json:
        print(json.dumps({"components": rows, "broken": broken}, indent=2))
        return EXIT_OK
    for kind in KINDS:
        specs = [r for r in rows if r["kind"] == kind]
        print(f"{kind} ({KINDS[kind].recipe_key})")
        for r in specs:
            print(f"  {r['name']:<22} {r['package']:<16} {r['description']}")
        if not specs:
            print("  (none)")
    print("plugins (names for INSTRUCTRL_DISABLE_PLUGINS)")
    for plugin, package in sorted({(r["plugin"], r["package"]) for r in rows}):
        print(f"  {plugin:<38} {package}")
    if broken:
        print("broken plugins (left out)")
        for b in broken:
            print(f"  {b['plugin']:<22} {b['package']:<16} {b['error']}")
    return EXIT_OK


def cmd_recipes(args: argparse.Namespace) -> int:
    from .config import bundled_recipes, bundled_sweeps, load_yaml

    rows = []
    for kind, bundled in (("recipe", bundled_recipes()), ("sweep", bundled_sweeps())):
        for name, path in bundled.items():  # a sweep runs with `instructrl sweep NAME`
            cfg = load_yaml(path)
            rows.append(
                {
                    "name": name,
                    "kind": kind,
                    "description": str(cfg.get("description") or ""),
                    "path": str(path),
                }
            )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        width = max([14, *(len(r["name"]) + 1 for r in rows)])
        for r in rows:
            tag = "[sweep] " if r["kind"] == "sweep" else ""
            print(f"{r['name']:<{width}} {tag}{r['description']}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .api import describe
    from .config import load_recipe
    from .runner import default_run_dir, prepare_run_dir, run_recipe

    if args.resume and args.overwrite:
        raise ArgumentError("instructrl run: --resume and --overwrite cannot be combined")
    if args.resume and not args.run_dir:
        raise ArgumentError("instructrl run: --resume needs --run-dir (the run to continue)")
    overrides = list(args.overrides)
    if args.quiet or args.json:  # --json: stdout holds the JSON document alone
        overrides.insert(0, "trainer.enable_progress_bar=false")
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.recipe)
    prepare_run_dir(run_dir, resume=args.resume, overwrite=args.overwrite)  # before anything else
    recipe = load_recipe(args.recipe, overrides, smoke=args.smoke)
    if args.dry_run:
        info = describe(recipe, run_dir, use_cache=not args.no_cache)
        print(json.dumps(info, indent=2, default=str) if args.json else format_dry_run(info))
        return EXIT_OK
    stream = sys.stderr if args.json else sys.stdout  # --json: the stage lines go to stderr
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=stream, flush=True))
    summary = run_recipe(
        recipe,
        run_dir,
        resume=args.resume,
        overwrite=args.overwrite,
        use_cache=not args.no_cache,
        argv=["instructrl", *argv],
        log=log,
    )
    from .io import is_global_zero

    if is_global_zero():
        print(json.dumps(summary, indent=2) if args.json else format_summary(summary, run_dir))
    return EXIT_OK


# --------------------------------------------------------------------------------------------


HEADLINE = [
    ("eval/win_rate_vs_sft", "win rate vs SFT (T=1, ties ½)"),
    ("eval/strict_win", "strict wins"),
    ("eval/strict_loss", "strict losses"),
    ("eval/win_rate_vs_sft_greedy", "win rate vs SFT (greedy)"),
    ("eval/gold_score", "gold score: RL"),
    ("eval/gold_score_sft", "gold score: SFT"),
    ("eval/rl_start/gold_score", "gold score: RL init"),
    ("eval/gold_content", "gold content: RL"),
    ("eval/gold_content_sft", "gold content: SFT"),
    ("eval/rm_score", "RM score: RL"),
    ("eval/kl_to_sft", "KL to SFT (nats/response)"),
    ("eval/pretrain_loss_base", "pretrain-text loss: base"),
    ("eval/pretrain_loss_sft", "pretrain-text loss: SFT"),
    ("eval/rl_start/pretrain_loss", "pretrain-text loss: RL init"),
    ("eval/pretrain_loss", "pretrain-text loss: RL"),
    ("rm/accuracy", "RM accuracy vs gold (held out)"),
    ("rm/labeler_ceiling", "labeler ceiling"),
    ("eval/n_prompts", "held-out prompts"),
    ("time/total_s", "wall time (s)"),
]


def format_summary(summary: dict[str, Any], run_dir: Path) -> str:
    """The result table printed at the end of a run."""
    rows = [(label, summary[key]) for key, label in HEADLINE if key in summary]
    rows += [(k, v) for k, v in sorted(summary.items()) if k.startswith("rm/accuracy/")]
    if not rows:
        rows = [(k, v) for k, v in sorted(summary.items()) if isinstance(v, (int, float))][:20]
    width = max(len(r[0]) for r in rows) if rows else 10
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -------"]
    for label, value in rows:
        v = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<{width}}  {v}")
    lines.append(f"\nrun dir: {run_dir}  (summary.json, config.yaml, <stage>/metrics.csv)")
    return "\n".join(lines)


def format_dry_run(info: dict[str, Any]) -> str:
    from omegaconf import OmegaConf

    out = ["# resolved config", OmegaConf.to_yaml(OmegaConf.create(info["config"])).rstrip(), "", "# plan"]
    for s in info["plan"]:
        where = f" → {s['dir']}" if s["dir"] else ""
        extra = "" if s["in_recipe"] else " (dependency)"
        note = f"  {s['note']}" if s["note"] else ""
        out.append(f"  {s['stage']:<9} {s['status']:<8}{where}{extra}{note}")
    out.append("\n# derived")
    for stage, d in info["derived"].items():
        out.append(f"  {stage}:")
        for k, v in d.items():
            out.append(f"    {k}: {v}")
    if info["paths"]:
        out.append("\n# model paths")
        for p in info["paths"]:
            out.append(f"  {p['key']:<24} {p['status']:<15} {p['path']}")
    if info["ignored_keys"]:
        out.append("\n# ignored (belong to a component that is not selected)")
        out += [f"  {k}" for k in info["ignored_keys"]]
    out.append("\nvalid; nothing was written (--dry-run)")
    return "\n".join(out)


def quiet_libraries(verbose: bool = False) -> None:
    """Keep library chatter (device banners, new-head warnings) out of the way."""
    if verbose:
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lightning.pytorch  # noqa: F401  (sets its loggers to INFO on import; lower them after)
    import transformers

    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for pattern in (
        r".*does not have many workers.*",
        r".*LeafSpec.*",
        r".*is deprecated.*",
        r".*Checkpoint directory.*exists.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def resume_command(argv: Sequence[str], run_dir: str | os.PathLike[str]) -> str:
    """The command line that resumes the interrupted ``instructrl run`` of ``argv``: the same
    recipe and overrides, ``--run-dir DIR --resume`` (no ``--overwrite``)."""
    import shlex

    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--run-dir":
            skip = True
            continue
        if a.startswith("--run-dir=") or a in ("--overwrite", "--resume", "--dry-run"):
            continue
        out.append(a)
    return shlex.join(["instructrl", *out, "--run-dir", os.fspath(run_dir), "--resume"])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the launcher with ``argv`` (default: ``sys.argv[1:]``); return the exit code.

    Exit codes: 0 success; 1 a failure while running (the message names the stage, or the path
    that could not be written); 2 bad input (recipe, overrides, data, a ``--resume`` whose config
    differs in keys that are not safe to change, nothing to resume, a run dir locked by a live run);
    130 stopped by SIGINT (Ctrl-C) and 143 stopped by SIGTERM. ``instructrl run`` stops on either
    signal at the next safe point (the end of the current optimiser step), writes a checkpoint,
    records ``run/status: interrupted`` and prints the command that resumes it; a second signal
    stops at once (every file is written atomically, so nothing is left half-written)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        # key=value overrides may sit anywhere after the sub-command (argparse cannot interleave
        # a variadic positional with options), so they are taken out first.
        # The value of an option that itself takes key=value text (sweep --grid k=v1,v2) is not one.
        kv_options = key_value_options()
        taken = {i + 1 for i, a in enumerate(argv) if a in kv_options}
        is_override = [i > 0 and i not in taken and bool(OVERRIDE.match(a)) for i, a in enumerate(argv)]
        overrides = [a for a, o in zip(argv, is_override) if o]
        rest = [a for a, o in zip(argv, is_override) if not o]
        args = parser.parse_args(rest)
        if hasattr(args, "overrides"):
            args.overrides = [*args.overrides, *overrides]
        elif overrides:
            raise ArgumentError(
                f"instructrl {args.command}: unexpected key=value arguments: {' '.join(overrides)}"
            )
        debug = debug or getattr(args, "debug", False)
        quiet_libraries()
        if args.command is None:
            parser.print_help()
            return EXIT_BAD_INPUT
        if args.command != "plugins":  # `instructrl plugins` lists broken plugins; the rest stop
            from .registry import get_registry

            get_registry()
        if args.command == "run":
            from .training import install_stop_handlers

            restore = install_stop_handlers()  # SIGINT / SIGTERM: stop at the next safe point
            try:
                return cmd_run(args, argv)
            finally:
                restore()
        if args.command == "plugins":
            return cmd_plugins(args)
        if args.command == "recipes":
            return cmd_recipes(args)
        return args.handler(args)
    except KeyboardInterrupt as exc:
        code = int(getattr(exc, "exit_code", EXIT_INTERRUPTED))
        name = getattr(exc, "signal_name", "SIGINT")
        run_dir = getattr(exc, "run_dir", None)
        if run_dir is None:
            print(f"interrupted ({name})", file=sys.stderr)
        else:
            how = "stopped at once" if getattr(exc, "at_once", False) else "checkpoint written"
            print(
                f"interrupted ({name}, {how}): run dir {run_dir}; resume with: {resume_command(argv, run_dir)}",
                file=sys.stderr,
            )
        return code
    except InstructrlError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a bug or an environment problem: name it, traceback with --debug
        if debug:
            traceback.print_exc()
        print(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


def entry_point() -> None:
    """The ``instructrl`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
