"""Experiment trackers fed by each round's record: TensorBoard and MLflow (optional extras).

Both are round callbacks (``on_round``): every number of :func:`~aumai_fedtrain.observability.
records.scalars` is logged at the round's step. :class:`TensorBoardLogger` writes event files
with tensorboardX (``pip install "aumai-fedtrain[tensorboard]"``); :class:`MlflowLogger` logs
the config as params and the numbers as metrics to an MLflow run (``pip install
"aumai-fedtrain[mlflow]"``), in MLflow's default local store unless given a tracking URI.
"""

from __future__ import annotations

import time
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import Any

from aumai_fedtrain.models import RoundRecord, TrainingConfig
from aumai_fedtrain.observability.records import scalars

__all__ = ["MlflowLogger", "TensorBoardLogger", "config_params", "require_extra"]


def require_extra(module: str, extra: str) -> ModuleType:
    """Import ``module``; ``ImportError`` naming the extra to install when it is missing."""
    try:
        return import_module(module)
    except ModuleNotFoundError as exc:
        raise ImportError(
            f"{exc.name} is not installed; install the {extra} extra: "
            f"pip install 'aumai-fedtrain[{extra}]'"
        ) from None


def config_params(config: TrainingConfig) -> dict[str, str]:
    """The config as flat ``name -> text`` pairs (``simulation.hidden_units``, ...)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        else:
            flat[prefix.rstrip(".")] = str(value)

    walk("", config.model_dump(mode="json"))
    return flat


class TensorBoardLogger:
    """Writes each round's numbers as TensorBoard scalars (step = round) into ``logdir``.

    The config goes in once as text (``config``). Call :meth:`close` at the end.
    """

    def __init__(self, logdir: str | Path, config: TrainingConfig) -> None:
        tensorboardx = require_extra("tensorboardX", "tensorboard")
        self.logdir = Path(logdir)
        self._writer = tensorboardx.SummaryWriter(logdir=str(self.logdir))
        lines = [f"{name}: {value}" for name, value in config_params(config).items()]
        self._writer.add_text("config", "  \n".join(lines), global_step=0)

    def __call__(self, record: RoundRecord) -> None:
        for name, value in scalars(record).items():
            self._writer.add_scalar(name, value, global_step=record.round_id)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()


class MlflowLogger:
    """Logs a run to MLflow: the config as params, each round's numbers as metrics.

    Parameters
    ----------
    config
        The run's config (logged as params).
    tracking_uri
        Where MLflow stores runs; None uses MLflow's default (``MLFLOW_TRACKING_URI``, else
        its local store in the current folder).
    experiment
        The experiment's name (created when missing); None uses ``config.model_name``.
    run_name
        The MLflow run's name; None lets MLflow choose one.
    """

    def __init__(
        self,
        config: TrainingConfig,
        *,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        run_name: str | None = None,
    ) -> None:
        client_module = require_extra("mlflow.tracking", "mlflow")
        entities = require_extra("mlflow.entities", "mlflow")
        self._entities = entities
        self._client = client_module.MlflowClient(tracking_uri=tracking_uri)
        name = experiment or config.model_name
        found = self._client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found else self._client.create_experiment(name)
        self.run_id: str = self._client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [entities.Param(key, value) for key, value in config_params(config).items()]
        self._client.log_batch(self.run_id, params=params)

    def __call__(self, record: RoundRecord) -> None:
        now = int(time.time() * 1000)
        metrics = [
            self._entities.Metric(name, value, now, record.round_id)
            for name, value in scalars(record).items()
        ]
        self._client.log_batch(self.run_id, metrics=metrics)

    def close(self, failed: bool = False) -> None:
        """End the MLflow run, as FAILED when the run failed."""
        self._client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
