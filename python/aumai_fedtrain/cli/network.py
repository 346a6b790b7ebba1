"""The network side of the CLI: the ``node`` command and ``run --nodes-file``.

``aumai_fedtrain.cli`` registers :data:`node_command` and decorates ``run`` with
:func:`nodes_file_options`; the work is done here so that the CLI module stays small.
"""

from __future__ import annotations

import logging
import os
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import click

from aumai_fedtrain.cli.errors import InputError
from aumai_fedtrain.cli.plugins import load_trainer_factory
from aumai_fedtrain.inputs import load_model_file
from aumai_fedtrain.models import FederatedNode, TrainingConfig
from aumai_fedtrain.network import http_module
from aumai_fedtrain.network.auth import SecretError, load_secret
from aumai_fedtrain.network.node_state import NodeStateError
from aumai_fedtrain.network.nodes_file import NodesFileError, read_nodes_file
from aumai_fedtrain.providers.base import UpdateProvider
from aumai_fedtrain.providers.in_process import NodeProgress
from aumai_fedtrain.trainer import Evaluator, ModelInit, TrainerFactory

__all__ = [
    "StderrHandler",
    "config_file_option",
    "node_command",
    "nodes_file_options",
    "prepare_http_run",
]

logger = logging.getLogger("aumai_fedtrain.network")
CommandT = TypeVar("CommandT", bound=Callable[..., Any])
_MIB = 1024 * 1024
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _require_http(name: str) -> ModuleType:
    try:
        return http_module(name)
    except ImportError as exc:
        raise InputError(str(exc)) from None


def _secret(path: Path, what: str) -> bytes:
    try:
        return load_secret(path, what)
    except SecretError as exc:
        raise InputError(str(exc)) from None


def config_file_option(help_text: str) -> Callable[[CommandT], CommandT]:
    """The ``--config`` option (a TrainingConfig JSON file, as ``config_path``)."""
    return click.option("--config", "config_path", type=click.Path(path_type=Path), help=help_text)


def _check_tls(certfile: Path | None, keyfile: Path | None) -> None:
    if (certfile is None) != (keyfile is None):
        raise InputError("--ssl-certfile and --ssl-keyfile go together")
    if certfile is None or keyfile is None:
        return
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise InputError(f"cannot load --ssl-certfile/--ssl-keyfile: {exc}") from None


@click.command("node")
@click.option("--port", required=True, type=click.IntRange(0, 65535), help="Port (0: any).")
@click.option("--node-id", required=True, help="This node's id in the coordinator's nodes file.")
@click.option(
    "--key-file",
    required=True,
    type=click.Path(path_type=Path),
    help="Secret shared with the coordinator; every update is signed with it.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--token-file",
    type=click.Path(path_type=Path),
    help="The coordinator's bearer token; without it anyone may ask for training.",
)
@config_file_option(
    "TrainingConfig JSON file for local training (default: the built-in configuration)."
)
@click.option(
    "--shard",
    type=click.IntRange(min=0),
    help="Shard of the built-in synthetic dataset this node trains on (default: N for a node "
    "id node-N, else one chosen by the id).",
)
@click.option(
    "--trainer",
    "trainer_spec",
    help="Your trainer factory as module:factory (default: the built-in simulation).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the trainer's state (inner optimizer, data position) here: written after every "
    "round, taken up when the node starts again.",
)
@click.option("--ssl-certfile", type=click.Path(path_type=Path), help="TLS certificate (PEM).")
@click.option("--ssl-keyfile", type=click.Path(path_type=Path), help="TLS private key (PEM).")
@click.option(
    "--max-body-mb",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Largest request body accepted, in MiB.",
)
@click.option(
    "--log-level",
    type=click.Choice(_LOG_LEVELS),
    default="info",
    show_default=True,
    help="How much the node logs.",
)
@click.option(
    "--allow-unsigned-requests",
    is_flag=True,
    help="Also train on requests not signed with the key (the user guide's Pattern 3): "
    "whoever may send requests can then make the node train and reset its state.",
)
@click.option(
    "--log-format",
    type=click.Choice(("text", "json")),
    default="text",
    show_default=True,
    help="json: one JSON object per log line.",
)
@click.option(
    "--metrics-token-file",
    type=click.Path(path_type=Path),
    help="Bearer token that GET /metrics needs (default: the --token-file token).",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="Most connections served at once (beyond: counted as busy in /metrics).",
)
def node_command(
    port: int,
    node_id: str,
    key_file: Path,
    host: str,
    token_file: Path | None,
    config_path: Path | None,
    shard: int | None,
    trainer_spec: str | None,
    state_dir: Path | None,
    ssl_certfile: Path | None,
    ssl_keyfile: Path | None,
    max_body_mb: int,
    log_level: str,
    allow_unsigned_requests: bool,
    log_format: str,
    metrics_token_file: Path | None,
    max_connections: int,
) -> None:
    """Serve a training node: POST /train trains one round, GET /health, GET /metrics."""
    from aumai_fedtrain.cli.observe import node_logging

    server = _require_http("server")
    if not node_id.strip():
        raise InputError("--node-id must not be empty")
    key = _secret(key_file, "key")
    token = _secret(token_file, "token") if token_file is not None else None
    metrics_token = (
        _secret(metrics_token_file, "metrics token") if metrics_token_file is not None else None
    )
    config = (
        load_model_file(config_path, TrainingConfig, "config", InputError)
        if config_path is not None
        else TrainingConfig()
    )
    factory: TrainerFactory
    if trainer_spec is not None:
        if shard is not None:
            raise InputError("--shard is for the built-in trainer; it cannot go with --trainer")
        factory, trainer_name = load_trainer_factory(trainer_spec), trainer_spec
    else:
        from aumai_fedtrain.simulation import SimulationTrainer, shard_of

        chosen = shard if shard is not None else shard_of(node_id)

        def factory(node: str, node_config: TrainingConfig) -> SimulationTrainer:
            return SimulationTrainer(node, node_config, shard=chosen)

        trainer_name = f"built-in simulation, shard {chosen}"
    _check_tls(ssl_certfile, ssl_keyfile)
    if state_dir is not None:
        _check_state_dir(state_dir)
    try:
        sock = server.listen(host, port)
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    node_logging(log_format, log_level)
    if token is None:
        logger.warning("no --token-file: anyone who reaches this node may ask it to train")
    if allow_unsigned_requests:
        logger.warning(
            "--allow-unsigned-requests: requests need no signature by the key, so %s can make "
            "this node train and reset its state",
            "anyone who reaches it" if token is None else "any holder of the token",
        )
    settings = server.NodeSettings(
        node_id=node_id,
        key=key,
        trainer_factory=factory,
        config=config,
        token=token,
        max_body_bytes=max_body_mb * _MIB,
        trainer_name=trainer_name,
        metrics_token=metrics_token,
        state_dir=state_dir,
        allow_unsigned_requests=allow_unsigned_requests,
    )
    try:  # makes the trainer and takes up its saved state: a failure stops us here
        app = server.create_app(settings)
    except NodeStateError as exc:
        raise InputError(f"--state-dir: {exc}") from None
    scheme = "https" if ssl_certfile is not None else "http"
    shown_host = f"[{host}]" if ":" in host else host
    url = f"{scheme}://{shown_host}:{sock.getsockname()[1]}"
    if log_format == "json":
        logger.info(
            "node %s serving on %s (trainer: %s)",
            node_id,
            url,
            trainer_name,
            extra={"event": "serving", "node_id": node_id, "url": url},
        )
    else:
        click.echo(f"Node {node_id} serving on {url}  (trainer: {trainer_name})")
        sys.stdout.flush()
    server.serve(
        app,
        sock,
        ssl_certfile=str(ssl_certfile) if ssl_certfile is not None else None,
        ssl_keyfile=str(ssl_keyfile) if ssl_keyfile is not None else None,
        log_level=log_level,
        max_connections=max_connections,
        own_logging=log_format == "text",
    )


def _check_state_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create --state-dir {str(directory)!r}: {exc.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise InputError(f"--state-dir {str(directory)!r} is not writable")


_RUN_OPTIONS: list[tuple[str, click.ParamType[Any], str]] = [
    (
        "--nodes-file",
        click.Path(path_type=Path),
        "Train with the real nodes listed in this JSON file, over HTTP(S).",
    ),
    ("--token-file", click.Path(path_type=Path), "Bearer token sent to the nodes."),
    (
        "--ca-file",
        click.Path(path_type=Path),
        "CA certificate of the nodes' TLS certificates (host:port addresses use https).",
    ),
    (
        "--timeout",
        click.FloatRange(min=0, min_open=True),
        "Deadline of a round in seconds: with --nodes-file retries and transfers included "
        "(default 120, at most 86400); with --engine ray an actor's answer (default none).",
    ),
    (
        "--memory-budget-mb",
        click.IntRange(min=1),
        "MiB that answers being decoded at once may take (default: room for two, >= 1024).",
    ),
]


def nodes_file_options(command: CommandT) -> CommandT:
    """Add ``--nodes-file`` and the coordinator's network options to the ``run`` command."""
    for name, kind, help_text in reversed(_RUN_OPTIONS):
        command = click.option(name, type=kind, help=help_text)(command)
    return command


def prepare_http_run(
    config: TrainingConfig,
    nodes: int | None,
    *,
    nodes_file: Path | None,
    token_file: Path | None,
    ca_file: Path | None,
    min_nodes: int | None,
    timeout: float | None,
    memory_budget_mb: int | None,
    model_init: ModelInit | None,
    evaluator: Evaluator | None,
    on_node_done: NodeProgress | None = None,
) -> tuple[TrainingConfig, list[FederatedNode], UpdateProvider] | None:
    """For ``run --nodes-file``: the config, the nodes and an ``HttpUpdateProvider``.

    Returns None without ``--nodes-file`` (the nodes train in process), after checking that
    no other network option was given.
    """
    if nodes_file is None:
        given = [
            name
            for name, value in (
                ("--token-file", token_file),
                ("--ca-file", ca_file),
                ("--timeout", timeout),
                ("--memory-budget-mb", memory_budget_mb),
            )
            if value is not None
        ]
        if given:
            raise InputError(f"{given[0]} needs --nodes-file")
        return None
    if nodes is not None:
        raise InputError("--nodes cannot go with --nodes-file (the file lists the nodes)")
    provider_module = _require_http("provider")
    try:
        listed = read_nodes_file(nodes_file)
    except NodesFileError as exc:
        raise InputError(str(exc)) from None
    node_list = listed.nodes
    if min_nodes is not None and min_nodes > len(node_list):
        raise InputError(f"--min-nodes {min_nodes} exceeds the {len(node_list)} nodes of the file")
    config = config.model_copy(update={"num_nodes": len(node_list)})
    try:
        provider = provider_module.HttpUpdateProvider(
            listed.keys,
            token=_secret(token_file, "token") if token_file is not None else None,
            tokens=listed.tokens,
            ca_file=ca_file,
            min_nodes=min_nodes or 1,
            timeout=timeout or 120.0,
            memory_budget=memory_budget_mb * _MIB if memory_budget_mb is not None else None,
            model_init=model_init,
            evaluator=evaluator,
            on_node_done=on_node_done,
        )
    except ValueError as exc:
        raise InputError(str(exc)) from None
    return config, node_list, provider


class StderrHandler(logging.Handler):
    """Writes records to the ``sys.stderr`` of the moment (it may be replaced after set-up)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
        except Exception:
            self.handleError(record)
