"""Lightning loggers, one recipe key away: ``loggers=[{name: csv}, {name: tensorboard}]``.

Each stage writes its own logs under ``RUN/<stage>/``. ``csv`` is always present (it writes the
``metrics.csv`` the report and sweeps read); the others need their optional extra installed.
"""

from __future__ import annotations

import csv
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

from instructrl.core.errors import ConfigError
from instructrl.core.fields import param
from instructrl.core.hookspecs import Register, hookimpl
from instructrl.core.io import atomic_write
from instructrl.core.registry import BuildContext
from instructrl.core.types import Needs
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only


def _require(module: str, extra: str, name: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"loggers: '{name}' needs the '{module}' package (pip install 'instructrl[{extra}]')"
        )


@dataclass
class CSVConfig:
    flush_every: int = param(50, "Write metrics.csv every N logged steps (and at the end).")


def make_csv(config: CSVConfig, ctx: BuildContext) -> Logger:
    """Lightning's CSVLogger writing RUN/<stage>/metrics.csv (always on), crash-safe and resumable
    (:class:`ResumableCSVLogger`)."""
    return ResumableCSVLogger(
        save_dir=str(ctx.stage_dir), name="", version="", flush_logs_every_n_steps=config.flush_every
    )


def _row_step(row: dict[str, object]) -> float:
    try:
        return float(row.get("step"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("inf")


class ResumableWriter(ExperimentWriter):
    """Lightning's CSV writer keeping every row in memory and rewriting ``metrics.csv`` atomically
    (:func:`~instructrl.core.io.atomic_write`) on every save; ``keep`` loads the rows already on
    disk instead of deleting the file."""

    def __init__(self, log_dir: str, keep: bool) -> None:
        self.keep, self.rows, self.dirty = keep, [], False
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self.keep and path.is_file():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                self.metrics_keys = list(reader.fieldnames or [])
                self.rows = list(reader)
        elif path.is_file():
            path.unlink()

    def truncate(self, step: int) -> None:
        """Keep the rows logged at steps ``<= step``; the header shrinks to their keys."""
        self.metrics = [m for m in self.metrics if _row_step(m) <= step]
        self.rows = [r for r in self.rows if _row_step(r) <= step]
        self.metrics_keys = sorted({k for r in self.rows for k, v in r.items() if v not in ("", None)})
        self.dirty = True
        self.save()

    def save(self) -> None:
        if self.metrics:
            self._record_new_keys()
            self.rows.extend(self.metrics)
            self.metrics, self.dirty = [], True
        if not self.dirty:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.metrics_keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        atomic_write(self.metrics_file_path, buf.getvalue())
        self.dirty = False


class ResumableCSVLogger(CSVLogger):
    """A :class:`lightning.pytorch.loggers.CSVLogger` whose ``metrics.csv`` is rewritten atomically
    on every flush (a kill never leaves a half-written file) and survives a resume. Lightning's
    writer deletes the file when it starts; this one, when ``fit`` resumes a checkpoint
    (``resuming``, set by :func:`instructrl.plugins.stages.common.fit`), keeps the rows up to the
    checkpoint's step (:meth:`resume_at`, called by :class:`~instructrl.plugins.stages.common.StageCheckpoint`)
    and drops the later ones, which the resumed run logs again: no row lost, none duplicated."""

    resuming = False

    @property
    @rank_zero_experiment
    def experiment(self) -> ResumableWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ResumableWriter(self.log_dir, keep=self.resuming)
        return self._experiment

    @rank_zero_only
    def resume_at(self, step: int) -> None:
        self.experiment.truncate(step)


@dataclass
class TensorBoardConfig:
    subdir: str = param("tensorboard", "Event files go to RUN/<stage>/<subdir>.")


def make_tensorboard(config: TensorBoardConfig, ctx: BuildContext) -> Logger:
    """Lightning's TensorBoardLogger (needs the tensorboard extra)."""
    _require("tensorboard", "tensorboard", "tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=str(ctx.stage_dir), name=config.subdir, version="")


@dataclass
class WandbConfig:
    project: str = param("instructrl", "W&B project.")
    entity: str | None = param(None, "W&B entity (team or user).")
    offline: bool = param(False, "Log offline (sync later with `wandb sync`).")
    group: str | None = param(None, "Run group; null = the run directory's name.")


def make_wandb(config: WandbConfig, ctx: BuildContext) -> Logger:
    """Lightning's WandbLogger (needs the wandb extra); one W&B run per stage, grouped by run."""
    _require("wandb", "wandb", "wandb")
    from lightning.pytorch.loggers import WandbLogger

    run_name = ctx.run_name
    return WandbLogger(
        project=config.project,
        entity=config.entity,
        offline=config.offline,
        group=config.group or run_name,
        name=f"{run_name}/{ctx.stage}",
        save_dir=str(ctx.stage_dir),
    )


@dataclass
class MLflowConfig:
    experiment: str = param("instructrl", "MLflow experiment name.")
    tracking_uri: str | None = param(None, "Tracking URI; null = ./mlruns under the stage dir.")


def make_mlflow(config: MLflowConfig, ctx: BuildContext) -> Logger:
    """Lightning's MLFlowLogger (needs the mlflow extra)."""
    _require("mlflow", "mlflow", "mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    uri = config.tracking_uri or f"file:{ctx.stage_dir}/mlruns"
    return MLFlowLogger(experiment_name=config.experiment, tracking_uri=uri, run_name=ctx.stage)


@hookimpl
def register_loggers(register: Register) -> None:
    register("csv", make_csv, config=CSVConfig, needs=Needs(always_on=True))
    register("tensorboard", make_tensorboard, config=TensorBoardConfig)
    register("wandb", make_wandb, config=WandbConfig)
    register("mlflow", make_mlflow, config=MLflowConfig)
