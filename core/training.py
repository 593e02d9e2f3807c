"""What the runner and every stage share: the stage context (what a stage gets from the runner),
the layout of a stage dir, and stopping on SIGINT / SIGTERM at a safe point. The Lightning
side — the Trainer factory, resumable checkpoints and data order, the sequence layout — is the
stage toolkit, :mod:`instructrl.plugins.stages.common`."""

from __future__ import annotations

import dataclasses
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Recipe
from .fields import field_for_role
from .registry import BuildContext

if TYPE_CHECKING:
    from .protocols import Policy, Task

MODEL_SUBDIR = "model"
CHECKPOINT_SUBDIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"


@dataclass
class StageContext:
    """What a stage gets from the runner.

    Attributes:
        recipe: the validated recipe.
        name: the stage name.
        stage_dir: where the stage writes (``metrics.csv``, ``checkpoints/``, ``model/`` …).
        paths: output model dirs of the stages this one depends on (``{"sft": ".../model"}``).
        resume: continue from ``stage_dir/checkpoints/last.ckpt`` if present.
        run_name: the run directory's name (loggers use it).
    """

    recipe: Recipe
    name: str
    stage_dir: Path
    paths: dict[str, str] = field(default_factory=dict)
    resume: bool = False
    run_name: str = "run"

    @property
    def model_dir(self) -> Path:
        return self.stage_dir / MODEL_SUBDIR

    def resolve(self, value: str, key: str) -> str:
        """A model path from the recipe: ``@stage`` becomes that stage's output model dir."""
        return self.build_context().resolve(value, key)

    def build_context(self, **fields: Any) -> BuildContext:
        """A BuildContext for component factories of this stage (``fields`` fill its attributes)."""
        fields.setdefault("seed", self.recipe.seed)
        return BuildContext(
            registry=self.recipe.registry,
            stage=self.name,
            stage_dir=self.stage_dir,
            run_name=self.run_name,
            paths=dict(self.paths),
            **fields,
        )

    def build(self, key: str, config: object = None, **fields: Any) -> Any:
        """Build the component the recipe selects at ``key`` (``"policy"``, ``"kl.estimator"`` …)."""
        choice = self.recipe.choice(key)
        conf = choice.config if config is None else config
        return self.recipe.registry.build(choice.kind, choice.name, conf, self.build_context(**fields))

    def build_policy(self, weights: str) -> Policy:
        """The recipe's Policy component loaded from ``weights`` (the config field marked
        ``model_path="weights"`` is replaced; the reference field is cleared)."""
        choice = self.recipe.choice("policy")
        conf = choice.config
        if conf is not None:
            cls = type(conf)
            changes: dict[str, object] = {}
            if (f := field_for_role(cls, "weights")) is not None:
                changes[f] = weights
            if (f := field_for_role(cls, "reference")) is not None:
                changes[f] = None
            conf = dataclasses.replace(conf, **changes)
        return self.build("policy", conf)

    def build_task(self) -> Task:
        """The recipe's Task."""
        return self.build("task")


def devices(recipe: Recipe) -> int:
    """Processes per stage from ``trainer.devices`` (1 unless a positive int)."""
    n = recipe.cfg.trainer.get("devices", 1)
    return int(n) if isinstance(n, int) and n > 0 else 1


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT (exit 130) or SIGTERM (exit 143): at the next safe point with a
    checkpoint, or ``at_once`` on a second signal."""

    def __init__(self, signum: int, at_once: bool = False) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.at_once = at_once

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopNow(BaseException):
    """Raised by the stage checkpoint after the checkpoint of a requested stop is written; not
    an ``Exception`` so nothing in between swallows it (the toolkit's ``fit`` turns it into Interrupted)."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested: int | None = None
_installed = False


def stop_requested() -> int | None:
    """The signal asking the run to stop at the next safe point, or ``None``."""
    return _requested


def _on_stop_signal(signum: int, frame: object) -> None:
    global _requested
    if _requested is None:  # the first: stop at the next safe point
        _requested = signum
        return
    raise Interrupted(signum, at_once=True)  # the second: stop now


def install_stop_handlers() -> Callable[[], None]:
    """Handle SIGINT and SIGTERM: the first asks for a stop at the next safe point (the end of an
    optimiser step, or between stages), the second stops at once. Returns the function that puts
    the previous handlers back (a no-op outside the main thread)."""
    global _installed, _requested
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, _on_stop_signal)
    _installed, _requested = True, None

    def restore() -> None:
        global _installed, _requested
        for s, handler in previous.items():
            signal.signal(s, handler)
        _installed, _requested = False, None

    return restore


def check_stop() -> None:
    """Raise :class:`Interrupted` if a stop was requested (between stages)."""
    if _requested is not None:
        raise Interrupted(_requested)


def reclaim_sigterm() -> None:
    """Lightning installs its own SIGTERM handler when training starts; while ours are installed,
    take SIGTERM back so both signals stop at the same safe point."""
    if _installed and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_stop_signal)
