"""Lightning loggers, one recipe key away: ``loggers=[{name: csv}, {name: tensorboard}]``.

Each stage writes its own logs under ``RUN/<stage>/``. ``csv`` is always present (it writes the
``metrics.csv`` the report and sweeps read); the others need their optional extra installed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from instructrl.core.errors import ConfigError
from instructrl.core.fields import param
from instructrl.core.hookspecs import Register, hookimpl
from instructrl.core.registry import BuildContext
from instructrl.core.types import Needs
from lightning.pytorch.loggers import Logger


def _require(module: str, extra: str, name: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"loggers: '{name}' needs the '{module}' package (pip install 'instructrl[{extra}]')"
        )


@dataclass
class CSVConfig:
    flush_every: int = param(50, "Write metrics.csv every N logged steps (and at the end).")


def make_csv(config: CSVConfig, ctx: BuildContext) -> Logger:
    """Lightning's CSVLogger writing RUN/<stage>/metrics.csv (always on)."""
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(
        save_dir=str(ctx.stage_dir), name="", version="", flush_logs_every_n_steps=config.flush_every
    )


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
