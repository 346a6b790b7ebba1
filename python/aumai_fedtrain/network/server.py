"""The node: a Starlette app that trains one round per ``POST /train``, served by uvicorn.

``POST /train`` takes a :class:`~aumai_fedtrain.network.wire.TrainRequest` (JSON or
safetensors, by ``Content-Type``), runs the node's trainer from the global weights, and answers
the :class:`LocalUpdate` (JSON, or safetensors when ``Accept`` names it) with its HMAC
signature in the ``X-Fedtrain-Signature`` header. ``GET /health`` tells that the node is up.

Answers: 401 without a bearer token and 403 with a wrong one (when the node has a token), 413
for a body over the size limit, 415 for another content type, 400 for a malformed body, 422 for
weights the trainer cannot use, 500 when the trainer fails. Training runs in a worker thread,
one round at a time, so the node keeps answering while it trains.

The server survives idle and half-open connections: a connection (or TLS handshake) that has
not sent a complete request head within ``header_timeout`` seconds is closed; beyond
``max_connections`` a new connection takes the place of the oldest one still waiting for its
head, or is closed at once when none is; the soft limit of open files is raised to the hard
one; and a log line repeated within :data:`REPEAT_WINDOW_SECONDS` is shown once, with a count.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import operator
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from aumai_fedtrain.inputs import describe_validation_error
from aumai_fedtrain.models import LocalUpdate, TensorMap, TrainingConfig
from aumai_fedtrain.network.auth import (
    NONCE_HEADER,
    SIGNATURE_HEADER,
    check_nonce,
    sign_update,
    tokens_equal,
)
from aumai_fedtrain.network.wire import (
    DEFAULT_MAX_BODY_BYTES,
    TrainRequest,
    WireError,
    body_media_type,
    decode_request,
    encode_update,
    response_media_type,
)
from aumai_fedtrain.simulation import (
    SyntheticTask,
    initial_model,
    new_inner_optimizer,
    train_locally,
)
from aumai_fedtrain.verification import HashVerifier

__all__ = [
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "REPEAT_WINDOW_SECONDS",
    "NodeSettings",
    "SimulationTrainer",
    "Trainer",
    "create_app",
    "listen",
    "serve",
]

logger = logging.getLogger("aumai_fedtrain.network")

DEFAULT_HEADER_TIMEOUT = 5.0
"""Seconds a connection may take to send a complete request head (or finish its TLS handshake)."""
DEFAULT_MAX_CONNECTIONS = 128
"""Most connections served at once."""
REPEAT_WINDOW_SECONDS = 10.0
"""A log line repeated within this many seconds is shown once, with a count."""
_SPARE_FILES = 64  # files a node needs besides its connections
_LOGGERS = ("", "asyncio", "uvicorn", "uvicorn.error", "uvicorn.access")
_MAX_REMEMBERED_LINES = 1024

Trainer = Callable[[int, TensorMap, TrainingConfig], tuple[Mapping[str, Any], float, int]]
"""``(round_id, weights, config) -> (pseudo_gradient, mean_loss, samples_used)``.

``weights`` are the global model weights to start from (float64 arrays; empty when the
coordinator sent none, then start from your initial model); ``config`` is the node's
:class:`TrainingConfig`. Return ``weights - trained_weights`` per key, the mean training loss of
the round and the number of samples processed. Raise ``ValueError`` for weights you cannot use
(the coordinator gets a 422 with your message).
"""


class SimulationTrainer:
    """The built-in trainer: the simulation's MLP on shard ``shard`` of the synthetic task.

    As in DiLoCo, the inner AdamW state stays on the node, in memory, across rounds. A retried
    round restarts from the state before it; a round earlier than the last one (a new run) and
    a restart of the node process start from a fresh AdamW.

    Parameters
    ----------
    shard
        Which node's shard of the seeded synthetic dataset this node holds.
    config
        The node's configuration; its ``seed`` and ``simulation`` settings define the task and
        the initial model, which must match the coordinator's.
    """

    def __init__(self, shard: int, config: TrainingConfig) -> None:
        self.shard = shard
        self.task = SyntheticTask(config.simulation, config.seed, cache_size=1)
        self._shapes = {key: value.shape for key, value in initial_model(config).items()}
        self.optimizer = new_inner_optimizer(config)
        self._lock = threading.Lock()
        self._last_round: int | None = None
        self._state_before_last_round: TensorMap = {}

    def __call__(
        self, round_id: int, weights: TensorMap, config: TrainingConfig
    ) -> tuple[TensorMap, float, int]:
        """Train ``local_steps`` AdamW steps from ``weights`` (the initial model when empty)."""
        start = weights if weights else initial_model(config)
        shapes = {key: value.shape for key, value in start.items()}
        if shapes != self._shapes:
            raise ValueError(
                f"global_weights do not match the built-in model: got shapes {shapes}, "
                f"expected {self._shapes}"
            )
        with self._lock:
            if round_id == self._last_round:  # asked again (a retry): redo it from the same state
                self.optimizer.load_state_dict(self._state_before_last_round)
            else:
                if self._last_round is not None and round_id < self._last_round:
                    self.optimizer = new_inner_optimizer(config)  # a new run: start afresh
                saved = self.optimizer.state_dict()
                self._state_before_last_round = {k: v.copy() for k, v in saved.items()}
                self._last_round = round_id
            delta, loss = train_locally(
                start, self.task, self.shard, round_id, config, self.optimizer
            )
        return delta, loss, config.local_steps * config.batch_size


@dataclass(frozen=True)
class NodeSettings:
    """Everything a node needs to serve.

    Parameters
    ----------
    node_id
        The id the coordinator knows this node by (in its nodes file).
    key
        The secret shared with the coordinator; every update is signed with it.
    trainer
        The local training function (see :data:`Trainer`).
    config
        The node's training configuration, passed to the trainer.
    token
        The coordinator's bearer token; None accepts training requests from anyone.
    max_body_bytes
        Largest request body accepted (413 above).
    trainer_name
        How ``GET /health`` and the logs name the trainer.
    """

    node_id: str
    key: bytes = field(repr=False)
    trainer: Trainer
    config: TrainingConfig = field(default_factory=TrainingConfig)
    token: bytes | None = field(default=None, repr=False)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    trainer_name: str = "custom"


class _Node:
    """State and endpoints of one node."""

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.rounds_trained = 0
        self._lock = threading.Lock()
        self._verifier = HashVerifier()

    async def health(self, request: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "node_id": self.settings.node_id,
                "trainer": self.settings.trainer_name,
                "rounds_trained": self.rounds_trained,
            }
        )

    async def train(self, request: Request) -> Response:
        denied = self._authorize(request.headers.get("authorization"))
        if denied is not None:
            return denied
        try:
            content_type = body_media_type(request.headers.get("content-type"))
            try:
                nonce = check_nonce(request.headers.get(NONCE_HEADER, ""))
            except ValueError as exc:
                raise WireError(str(exc)) from None
            body = await _read_body(request, self.settings.max_body_bytes)
            train_request = await run_in_threadpool(decode_request, body, content_type)
            fmt = response_media_type(request.headers.get("accept"))
            content, signature = await run_in_threadpool(self._train, train_request, nonce, fmt)
        except WireError as exc:
            return _problem(str(exc), exc.status)
        return Response(content, media_type=fmt, headers={SIGNATURE_HEADER: signature})

    def _authorize(self, header: str | None) -> Response | None:
        expected = self.settings.token
        if expected is None:
            return None
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            response = _problem("a bearer token is required", 401)
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        if not tokens_equal(token.strip(), expected):
            return _problem("wrong token", 403)
        return None

    def _train(self, request: TrainRequest, nonce: str, fmt: str) -> tuple[bytes, str]:
        """Run the trainer (one round at a time), sign and encode the update."""
        _check_finite(request.global_weights)
        started = time.perf_counter()
        with self._lock:
            try:
                result = self.settings.trainer(
                    request.round_id, request.global_weights, self.settings.config
                )
            except ValueError as exc:
                raise WireError(f"the trainer cannot use this request: {exc}", 422) from None
            except Exception as exc:
                logger.exception("round %d: the trainer failed", request.round_id)
                raise WireError(f"the trainer failed: {type(exc).__name__}: {exc}", 500) from None
            update = _as_update(result, self.settings.node_id, request.round_id)
            self.rounds_trained += 1
        signature = sign_update(self.settings.key, update, nonce, self._verifier)
        logger.info(
            "round %d: trained on %d samples, loss %.6f (%.3f s)",
            update.round_id,
            update.samples_used,
            update.loss,
            time.perf_counter() - started,
        )
        return encode_update(update, fmt), signature


def _problem(detail: str, status: int) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise WireError(f"body of {declared} bytes exceeds the limit of {limit} bytes", 413)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise WireError(f"body exceeds the limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _check_finite(weights: TensorMap) -> None:
    for key, value in weights.items():
        if not np.isfinite(value).all():
            raise WireError(f"global_weights[{key!r}] has non-finite values", 422)


def _as_update(result: Any, node_id: str, round_id: int) -> LocalUpdate:
    """The trainer's ``(gradients, loss, samples)`` as an update, or a 500 saying what is wrong."""
    try:
        gradients, loss, samples = result
        return LocalUpdate(
            node_id=node_id,
            round_id=round_id,
            gradients=dict(gradients),
            loss=loss,
            samples_used=operator.index(samples),
        )
    except (TypeError, ValueError) as exc:
        reason = describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
        logger.error("round %d: the trainer returned an invalid result: %s", round_id, reason)
        raise WireError(
            "the trainer returned an invalid result (expected (pseudo_gradient, loss, "
            f"samples_used)): {reason}",
            500,
        ) from None


def create_app(settings: NodeSettings) -> Starlette:
    """The node's ASGI application (``POST /train``, ``GET /health``)."""
    node = _Node(settings)
    return Starlette(
        routes=[
            Route("/train", node.train, methods=["POST"]),
            Route("/health", node.health, methods=["GET"]),
        ]
    )


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0 picks a free one); ``OSError`` if busy."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family)


def serve(
    settings: NodeSettings,
    sock: socket.socket,
    *,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    log_level: str = "info",
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> None:
    """Serve the node on the listening socket ``sock`` until interrupted (SIGINT/SIGTERM).

    ``header_timeout`` and ``max_connections`` bound idle connections (see the module doc).
    """
    open_files = raise_open_files_limit()
    protocol = functools.partial(
        _GuardedProtocol,
        header_timeout=header_timeout,
        max_connections=max(1, min(max_connections, open_files - _SPARE_FILES)),
    )
    config = uvicorn.Config(
        create_app(settings),
        http=protocol,  # type: ignore[arg-type]  # a protocol factory, as uvicorn calls it
        loop="asyncio",
        log_level=log_level,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        timeout_keep_alive=max(1, round(header_timeout)),
        timeout_graceful_shutdown=5,
    )
    for name in _LOGGERS:  # (uvicorn.Config has set up uvicorn's handlers)
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_RepeatFilter())
    _NodeServer(config, header_timeout).run(sockets=[sock])


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; the soft limit then."""
    if sys.platform == "win32":  # pragma: no cover - no such limit
        return DEFAULT_MAX_CONNECTIONS + _SPARE_FILES
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # not allowed here: keep the soft limit
            pass
    return soft if soft != resource.RLIM_INFINITY else sys.maxsize


class _NodeServer(uvicorn.Server):
    """uvicorn's server, with TLS handshakes bounded like request heads."""

    def __init__(self, config: uvicorn.Config, handshake_timeout: float) -> None:
        super().__init__(config)
        self._handshake_timeout = handshake_timeout

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if self.config.ssl is None:
            await super().startup(sockets)
            return
        # uvicorn leaves asyncio's default of 60 s for a TLS handshake; its listening servers
        # are made by this loop's create_server, here with the node's own bound.
        loop = asyncio.get_running_loop()
        create_server = loop.create_server
        loop.create_server = functools.partial(  # type: ignore[method-assign]
            create_server, ssl_handshake_timeout=self._handshake_timeout
        )
        try:
            await super().startup(sockets)
        finally:
            del loop.create_server


class _GuardedProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing connections that send no request head in time."""

    def __init__(self, *args: Any, header_timeout: float, max_connections: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._max_connections = max_connections
        self._head_timer: asyncio.TimerHandle | None = None
        self._waiting_since = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self._max_connections:
            waiting = [
                connection
                for connection in self.connections
                if isinstance(connection, _GuardedProtocol) and connection._head_timer is not None
            ]
            if not waiting:  # every connection is busy with a request: no room
                transport.abort()
                return
            min(waiting, key=lambda connection: connection._waiting_since).close_idle()
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a complete request head arrived
            self._stop_waiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_head()  # of the next request on this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def close_idle(self) -> None:
        """Close the connection, which has not sent a complete request head in time."""
        self._stop_waiting()
        if not self.transport.is_closing():
            self.transport.close()

    def _await_head(self) -> None:
        self._stop_waiting()
        self._waiting_since = self.loop.time()
        self._head_timer = self.loop.call_later(self._header_timeout, self.close_idle)

    def _stop_waiting(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None


class _RepeatFilter(logging.Filter):
    """Lets a log line through once per :data:`REPEAT_WINDOW_SECONDS`, then with a count."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        now = time.monotonic()
        first, repeats = self._seen.get(key, (-REPEAT_WINDOW_SECONDS, 0))
        if now - first < REPEAT_WINDOW_SECONDS:
            self._seen[key] = (first, repeats + 1)
            return False
        if len(self._seen) >= _MAX_REMEMBERED_LINES:
            self._seen.clear()
        self._seen[key] = (now, 0)
        if repeats:
            record.msg = f"{record.getMessage()} (and {repeats} more times in "
            record.msg += f"{REPEAT_WINDOW_SECONDS:g} s)"
            record.args = None
        return True
