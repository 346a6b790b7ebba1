"""The observability side of the CLI: ``run``'s metrics options, the progress line, logging,
and the ``report`` and ``status`` commands."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from aumai_fedtrain.checkpoint import CheckpointError
from aumai_fedtrain.cli.errors import InputError
from aumai_fedtrain.cli.network import StderrHandler
from aumai_fedtrain.models import GlobalState, RoundRecord, TrainingConfig
from aumai_fedtrain.observability.logs import JsonFormatter
from aumai_fedtrain.observability.metrics_file import MetricsFileError
from aumai_fedtrain.observability.records import drop_kind

__all__ = [
    "OBSERVE_OPTIONS",
    "RoundProgress",
    "observe_options",
    "report_command",
    "run_observers",
    "show_logs",
    "status_command",
]

CommandT = TypeVar("CommandT", bound=Callable[..., Any])
LOG_FORMATS = ("text", "json")
MAX_TABLE_ROWS = 50
_READ_ERRORS = (CheckpointError, MetricsFileError)

_OPTIONS: list[tuple[tuple[str, ...], dict[str, Any]]] = [
    (
        ("--metrics-file",),
        {
            "type": click.Path(dir_okay=False, path_type=Path),
            "help": "Append each round's metrics here as JSON lines (default with "
            "--checkpoint-dir: DIR/metrics.jsonl).",
        },
    ),
    (
        ("--tensorboard", "tensorboard_dir"),
        {
            "type": click.Path(file_okay=False, path_type=Path),
            "help": "Write TensorBoard event files into this folder (the tensorboard extra).",
        },
    ),
    (
        ("--mlflow", "mlflow"),
        {"is_flag": True, "help": "Log params and metrics to MLflow (the mlflow extra)."},
    ),
    (
        ("--mlflow-tracking-uri",),
        {"help": "MLflow tracking URI (default: MLflow's own, its local store here)."},
    ),
    (
        ("--mlflow-experiment",),
        {"help": "MLflow experiment name (default: the config's model_name)."},
    ),
    (
        ("--prometheus-port",),
        {
            "type": click.IntRange(1, 65535),
            "help": "Serve the coordinator's metrics at http://HOST:PORT/metrics "
            "(the prometheus extra).",
        },
    ),
    (
        ("--prometheus-host",),
        {"default": "127.0.0.1", "show_default": True, "help": "Address of --prometheus-port."},
    ),
    (
        ("--log-format",),
        {
            "type": click.Choice(LOG_FORMATS),
            "default": "text",
            "show_default": True,
            "help": "json: one JSON object per log line (every event, at info level).",
        },
    ),
]
OBSERVE_OPTIONS = (
    "metrics_file",
    "tensorboard_dir",
    "mlflow",
    "mlflow_tracking_uri",
    "mlflow_experiment",
    "prometheus_port",
    "prometheus_host",
    "log_format",
)
"""The parameter names :func:`observe_options` adds to a command."""


def observe_options(command: CommandT) -> CommandT:
    """Add the metrics, tracker, Prometheus and log-format options to ``run``."""
    for names, settings in reversed(_OPTIONS):
        command = click.option(*names, **settings)(command)
    return command


def show_logs(log_format: str = "text") -> None:
    """Print the library's log on stderr: warnings as ``LEVEL: message`` lines, or with
    ``json`` every event from info level on as one JSON object per line."""
    logger = logging.getLogger("aumai_fedtrain")
    handler = next((h for h in logger.handlers if isinstance(h, StderrHandler)), None)
    if handler is None:
        handler = StderrHandler()
        logger.addHandler(handler)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
        logger.setLevel(logging.INFO)
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logger.setLevel(logging.WARNING)


def node_logging(log_format: str, log_level: str) -> None:
    """Set up a node's logging (root logger) as text lines or JSON lines."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=log_level.upper(), handlers=[handler], force=True)


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class RoundProgress:
    """A one-line, in-place progress display on a terminal (stderr): the round, the nodes
    done in it, the last losses and accuracy, and an ETA from this session's round times."""

    def __init__(self, total: int, enabled: bool, clock: Callable[[], float] = time.monotonic):
        self.total = total
        self.enabled = enabled
        self._clock = clock
        self._shown = False
        self._current = 1
        self._started: float | None = None
        self._start_round = 0
        self._last = ""
        self._lock = threading.Lock()  # nodes of a network round settle in several threads

    def start(self, state: GlobalState) -> None:
        """The run starts after ``state``'s round (0, or the checkpoint's on resume)."""
        self._started = self._clock()
        self._start_round = state.round_id
        self._current = state.round_id + 1

    def eta(self, completed: int) -> str:
        """Time left for the remaining rounds at this session's mean round time."""
        done = completed - self._start_round
        if self._started is None or done <= 0:
            return "ETA --"
        per_round = (self._clock() - self._started) / done
        return f"ETA {_duration(per_round * (self.total - completed))}"

    def __call__(self, record: RoundRecord) -> None:
        line = f"loss {record.avg_loss:.6f}"
        if record.eval_loss is not None:
            line += f"  eval loss {record.eval_loss:.6f}"
        if record.eval_accuracy is not None:
            line += f"  acc {record.eval_accuracy:.2%}"
        self._last = line
        self._current = record.round_id + 1
        self._show(f"round {record.round_id}/{self.total}  {line}  {self.eta(record.round_id)}")

    def node_done(self, done: int, total: int) -> None:
        """Show how many nodes of the current round are done (throttled to ~100 updates)."""
        if done != total and done % max(1, total // 100):
            return
        last = f"  |  last: {self._last}" if self._last else ""
        self._show(
            f"round {self._current}/{self.total}  nodes {done}/{total}{last}  "
            f"{self.eta(self._current - 1)}"
        )

    def _show(self, line: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            click.echo(f"\r\x1b[2K  {line}", nl=False, err=True)
            self._shown = True

    def close(self) -> None:
        if self._shown:
            click.echo(err=True)


@contextlib.contextmanager
def run_observers(
    config: TrainingConfig, num_nodes: int, options: dict[str, Any]
) -> Iterator[list[Callable[[RoundRecord], None]]]:
    """The round callbacks ``run``'s options ask for (TensorBoard, MLflow, Prometheus),
    closed at the end (an MLflow run as FAILED when the run fails)."""
    from aumai_fedtrain.observability import trackers

    callbacks: list[Callable[[RoundRecord], None]] = []
    closers: list[Callable[[bool], None]] = []
    mlflow_settings = (options["mlflow_tracking_uri"], options["mlflow_experiment"])
    if not options["mlflow"] and mlflow_settings != (None, None):
        raise InputError("--mlflow-tracking-uri and --mlflow-experiment need --mlflow")
    try:
        if options["mlflow"]:  # (its import sets up MLflow's own log handlers)
            trackers.require_extra("mlflow.tracking", "mlflow")
        if options["log_format"] == "json":
            _json_everywhere()
        if options["tensorboard_dir"] is not None:
            board = trackers.TensorBoardLogger(options["tensorboard_dir"], config)
            callbacks.append(board)
            closers.append(lambda failed: board.close())
        if options["mlflow"]:
            mlflow = trackers.MlflowLogger(
                config,
                tracking_uri=options["mlflow_tracking_uri"],
                experiment=options["mlflow_experiment"],
            )
            callbacks.append(mlflow)
            closers.append(mlflow.close)
        if options["prometheus_port"] is not None:
            from aumai_fedtrain.observability.prometheus import CoordinatorExporter

            try:
                exporter = CoordinatorExporter(
                    options["prometheus_port"],
                    options["prometheus_host"],
                    total_rounds=config.global_rounds,
                    num_nodes=num_nodes,
                )
            except OSError as exc:
                raise InputError(
                    f"cannot serve --prometheus-port {options['prometheus_port']}: "
                    f"{exc.strerror or exc}"
                ) from None
            callbacks.append(exporter)
            closers.append(lambda failed: exporter.close())
    except ImportError as exc:
        _close_all(closers, True)
        raise InputError(str(exc)) from None
    failed = True
    try:
        yield callbacks
        failed = False
    finally:
        _close_all(closers, failed)


def _json_everywhere() -> None:
    """Make the handlers that libraries set up (MLflow's, say) write JSON lines too."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    for logger in [logging.getLogger(), *loggers]:
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler | StderrHandler):
                handler.setFormatter(JsonFormatter())


def _close_all(closers: list[Callable[[bool], None]], failed: bool) -> None:
    for close in reversed(closers):
        close(failed)


@click.command("report")
@click.argument("path", type=click.Path(path_type=Path))
def report_command(path: Path) -> None:
    """Write report.html and report.png of a run (a checkpoint folder or a metrics file)."""
    from aumai_fedtrain.observability.report import write_report

    try:
        html, png = write_report(path)
    except (*_READ_ERRORS, ImportError) as exc:
        raise InputError(str(exc)) from None
    click.echo(f"Wrote {html}")
    click.echo(f"Wrote {png}")


@click.command("status")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status_command(path: Path, as_json: bool) -> None:
    """Show a run's config, progress, credits, dropped nodes and last round (works while
    the run writes)."""
    from aumai_fedtrain.observability.status import read_status

    try:
        status = read_status(path)
    except _READ_ERRORS as exc:
        raise InputError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(status.as_json(), indent=2))
        return
    _print_status(status)


def _table(rows: Sequence[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        click.echo("  " + "  ".join(cells).rstrip())


def _figure(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt % value


def _bytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 1024**2:.2f} MiB"


def _print_status(status: Any) -> None:
    echo = click.echo
    echo(f"Run: {status.source}")
    config: TrainingConfig | None = status.config
    if config is not None:
        echo(
            f"  Config: {config.model_name}  nodes={config.num_nodes}  "
            f"rounds={config.global_rounds}  local_steps={config.local_steps}  "
            f"batch_size={config.batch_size}  lr={config.learning_rate:g}  "
            f"outer lr={config.outer_learning_rate:g}  momentum={config.outer_momentum:g}  "
            f"seed={config.seed}"
        )
    planned = f"/{config.global_rounds}" if config is not None else ""
    echo(f"  Last completed round: {status.completed_round}{planned}")
    if status.elapsed_seconds is not None:
        echo(f"  Training time: {_duration(status.elapsed_seconds)}")
    if status.bytes_to_nodes is not None:
        echo(
            f"  Bytes so far: {_bytes(status.bytes_to_nodes)} to the nodes, "
            f"{_bytes(status.bytes_from_nodes)} from them"
        )
    last: RoundRecord | None = status.last
    if last is None:
        echo("  No round completed yet.")
        return
    echo()
    echo(f"Round {last.round_id}:")
    nodes = f"/{last.num_nodes}" if last.num_nodes is not None else ""
    _table(
        [
            ("train loss", _figure(last.avg_loss, "%.6f")),
            ("eval loss", _figure(last.eval_loss, "%.6f")),
            ("eval accuracy", _figure(last.eval_accuracy and 100 * last.eval_accuracy, "%.2f%%")),
            ("participants", f"{last.num_participants}{nodes}"),
            ("samples", str(last.total_samples)),
            ("bytes to nodes", _bytes(last.bytes_to_nodes)),
            ("bytes from nodes", _bytes(last.bytes_from_nodes)),
            ("duration", f"{last.duration_seconds:.3f} s"),
            *((f"  {phase}", f"{seconds:.3f} s") for phase, seconds in last.phase_seconds.items()),
        ],
        ("figure", "value"),
    )
    echo()
    if last.dropped:
        echo(f"Dropped or benched in round {last.round_id}:")
        rows = [
            (*_state_and_kind(node, reason, last), node, reason)
            for node, reason in list(last.dropped.items())[:MAX_TABLE_ROWS]
        ]
        _table(
            [(state, node, kind, reason) for state, kind, node, reason in rows],
            ("state", "node", "kind", "reason"),
        )
        if len(last.dropped) > MAX_TABLE_ROWS:
            echo(f"  ... and {len(last.dropped) - MAX_TABLE_ROWS} more (--json lists all)")
    else:
        echo(f"No node dropped or benched in round {last.round_id}.")
    if status.credits:
        echo()
        echo("Credits (samples processed):")
        credits = sorted(status.credits.items())
        _table(
            [(node, str(samples)) for node, samples in credits[:MAX_TABLE_ROWS]],
            ("node", "samples"),
        )
        if len(credits) > MAX_TABLE_ROWS:
            echo(f"  ... and {len(credits) - MAX_TABLE_ROWS} more nodes (--json lists all)")


def _state_and_kind(node: str, reason: str, record: RoundRecord) -> tuple[str, str]:
    """``dropped`` or ``benched``, and the kind of the (last) failure."""
    if node in record.benched:  # "benched after N failed rounds: <the last failure>"
        return "benched", drop_kind(reason.partition(": ")[2])
    return "dropped", drop_kind(reason)


def is_terminal() -> bool:
    """Whether stderr is a terminal (the progress line is shown only there)."""
    return sys.stderr.isatty()
