"""The node: a Starlette app that trains one round per ``POST /train``, served by uvicorn.

``POST /train`` takes a :class:`~aumai_fedtrain.network.wire.TrainRequest` (JSON or
safetensors, by ``Content-Type``), runs the node's trainer from the global weights, and answers
the :class:`LocalUpdate` (JSON, or safetensors when ``Accept`` names it) with its HMAC
signature in the ``X-Fedtrain-Signature`` header. ``GET /health`` tells that the node is up.
``GET /metrics`` answers the node's counters in the Prometheus text format (requests by
outcome, training time, bytes in and out: :class:`~aumai_fedtrain.observability.prometheus.
NodeMetrics`), behind the metrics token when the node has one, else behind its token.

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
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from aumai_fedtrain.models import TensorMap, TrainingConfig
from aumai_fedtrain.network.auth import (
    NONCE_HEADER,
    RESET_HEADER,
    SIGNATURE_HEADER,
    check_nonce,
    sign_update,
    tokens_equal,
    verify_reset_proof,
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
from aumai_fedtrain.observability.prometheus import NodeMetrics
from aumai_fedtrain.trainer import NodeTrainer, TrainerFactory, TrainerResultError, as_update
from aumai_fedtrain.verification import HashVerifier

__all__ = [
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "REPEAT_WINDOW_SECONDS",
    "NodeSettings",
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
_MAX_RESET_NONCES = 4096


@dataclass(frozen=True)
class NodeSettings:
    """Everything a node needs to serve.

    Parameters
    ----------
    node_id
        The id the coordinator knows this node by (in its nodes file).
    key
        The secret shared with the coordinator; every update is signed with it.
    trainer_factory
        ``factory(node_id, config) -> NodeTrainer``: makes the node's trainer (see
        :mod:`aumai_fedtrain.trainer`).
    config
        The node's training configuration, passed to the factory.
    token
        The coordinator's bearer token; None accepts training requests from anyone.
    max_body_bytes
        Largest request body accepted (413 above).
    trainer_name
        How ``GET /health`` and the logs name the trainer.
    metrics_token
        The bearer token ``GET /metrics`` needs; None: the same as ``token``.
    """

    node_id: str
    key: bytes = field(repr=False)
    trainer_factory: TrainerFactory
    config: TrainingConfig = field(default_factory=TrainingConfig)
    token: bytes | None = field(default=None, repr=False)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    trainer_name: str = "custom"
    metrics_token: bytes | None = field(default=None, repr=False)


class _Node:
    """State and endpoints of one node.

    The trainer keeps its state across rounds. Before each round the node keeps a copy of that
    state, so a round asked again (a coordinator's retry) is redone from the same state; a
    round earlier than the last one trained (a new run) starts from a fresh trainer, but only
    when the request carries a reset proof by the node's key (see
    :func:`~aumai_fedtrain.network.auth.reset_proof`), used once: otherwise it gets a 409.
    """

    def __init__(self, settings: NodeSettings, metrics: NodeMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.rounds_trained = 0
        self._lock = threading.Lock()
        self._verifier = HashVerifier()
        self._trainer = self._new_trainer()
        self._last_round: int | None = None
        self._state_before_last_round: TensorMap = {}
        self._used_reset_nonces: set[str] = set()

    def _new_trainer(self) -> NodeTrainer:
        try:
            return self.settings.trainer_factory(self.settings.node_id, self.settings.config)
        except Exception as exc:
            raise RuntimeError(
                f"the trainer factory failed for node {self.settings.node_id!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def _prepare_round(self, round_id: int) -> None:
        """Bring the trainer's state to where ``round_id`` starts (called under the lock)."""
        if round_id == self._last_round:
            self._trainer.load_state_dict(self._state_before_last_round)
            return
        if self._last_round is not None and round_id < self._last_round:
            self._trainer = self._new_trainer()
        self._state_before_last_round = {
            key: np.array(value, copy=True) for key, value in self._trainer.state_dict().items()
        }
        self._last_round = round_id

    def _check_reset(self, round_id: int, nonce: str, proof: str | None) -> None:
        """Allow a new run from ``round_id`` only with a fresh proof by the node's key (409)."""
        valid = proof is not None and verify_reset_proof(self.settings.key, round_id, nonce, proof)
        if not valid or nonce in self._used_reset_nonces:
            raise WireError(
                f"round {round_id} is before the last round this node trained "
                f"({self._last_round}); only the coordinator holding this node's key can start "
                f"a new run (its first request carries a fresh {RESET_HEADER}): restart or "
                "resume the run from that coordinator",
                409,
            )
        if len(self._used_reset_nonces) >= _MAX_RESET_NONCES:
            self._used_reset_nonces.clear()
        self._used_reset_nonces.add(nonce)
        logger.warning("round %d: a new run from the coordinator: fresh trainer state", round_id)

    async def health(self, request: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "node_id": self.settings.node_id,
                "trainer": self.settings.trainer_name,
                "rounds_trained": self.rounds_trained,
            }
        )

    async def metrics_endpoint(self, request: Request) -> Response:
        expected = self.settings.metrics_token or self.settings.token
        denied = _authorize(request.headers.get("authorization"), expected)
        if denied is not None:
            return denied
        content, content_type = self.metrics.render()
        return Response(content, headers={"content-type": content_type})

    async def train(self, request: Request) -> Response:
        response = await self._answer(request)
        self.metrics.request(_OUTCOMES.get(response.status_code, "failed"))
        return response

    async def _answer(self, request: Request) -> Response:
        denied = _authorize(request.headers.get("authorization"), self.settings.token)
        if denied is not None:
            return denied
        try:
            content_type = body_media_type(request.headers.get("content-type"))
            try:
                nonce = check_nonce(request.headers.get(NONCE_HEADER, ""))
            except ValueError as exc:
                raise WireError(str(exc)) from None
            body = await _read_body(request, self.settings.max_body_bytes, self.metrics)
            train_request = await run_in_threadpool(decode_request, body, content_type)
            fmt = response_media_type(request.headers.get("accept"))
            proof = request.headers.get(RESET_HEADER)
            content, signature = await run_in_threadpool(
                self._train, train_request, nonce, fmt, proof
            )
        except WireError as exc:
            return _problem(str(exc), exc.status)
        self.metrics.sent_bytes.inc(len(content))
        return Response(content, media_type=fmt, headers={SIGNATURE_HEADER: signature})

    def _train(
        self, request: TrainRequest, nonce: str, fmt: str, proof: str | None
    ) -> tuple[bytes, str]:
        """Run the trainer (one round at a time), sign and encode the update."""
        _check_finite(request.global_weights)
        started = time.perf_counter()
        round_id = request.round_id
        with self._lock:
            if self._last_round is not None and round_id < self._last_round:
                self._check_reset(round_id, nonce, proof)
            self._prepare_round(round_id)
            try:
                with self.metrics.training_seconds.time():
                    result = self._trainer.train(round_id, request.global_weights)
            except ValueError as exc:
                raise WireError(f"the trainer cannot use this request: {exc}", 422) from None
            except Exception as exc:
                logger.exception("round %d: the trainer failed", round_id)
                raise WireError(f"the trainer failed: {type(exc).__name__}: {exc}", 500) from None
            try:
                update = as_update(result, self.settings.node_id, round_id)
            except TrainerResultError as exc:
                logger.error("round %d: %s", round_id, exc)
                raise WireError(str(exc), 500) from None
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


_OUTCOMES = {
    200: "trained",
    401: "unauthorized",
    403: "unauthorized",
    400: "bad_request",
    413: "bad_request",
    415: "bad_request",
    422: "bad_request",
    409: "conflict",
}
"""HTTP status of a ``POST /train`` answer -> the outcome counted (others: ``failed``)."""


def _authorize(header: str | None, expected: bytes | None) -> Response | None:
    """None when ``header`` carries the bearer token ``expected`` (or none is needed), else
    the 401 or 403 answer."""
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


def _problem(detail: str, status: int) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


async def _read_body(request: Request, limit: int, metrics: NodeMetrics) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise WireError(f"body of {declared} bytes exceeds the limit of {limit} bytes", 413)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        metrics.received_bytes.inc(len(chunk))
        if size > limit:
            raise WireError(f"body exceeds the limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _check_finite(weights: TensorMap) -> None:
    for key, value in weights.items():
        if not np.isfinite(value).all():
            raise WireError(f"global_weights[{key!r}] has non-finite values", 422)


def create_app(settings: NodeSettings) -> Starlette:
    """The node's ASGI application (``POST /train``, ``GET /health``, ``GET /metrics``).

    Its counters are ``app.state.metrics`` (a
    :class:`~aumai_fedtrain.observability.prometheus.NodeMetrics`).
    """
    metrics = NodeMetrics()
    node = _Node(settings, metrics)
    app = Starlette(
        routes=[
            Route("/train", node.train, methods=["POST"]),
            Route("/health", node.health, methods=["GET"]),
            Route("/metrics", node.metrics_endpoint, methods=["GET"]),
        ]
    )
    app.state.metrics = metrics
    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0 picks a free one); ``OSError`` if busy."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    return socket.create_server((host, port), family=family)


def serve(
    app: Starlette,
    sock: socket.socket,
    *,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    log_level: str = "info",
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    own_logging: bool = True,
) -> None:
    """Serve the node ``app`` (:func:`create_app`) on the listening socket ``sock`` until
    interrupted (SIGINT/SIGTERM).

    ``header_timeout`` and ``max_connections`` bound idle connections (see the module doc); a
    connection refused for want of room is counted as a ``busy`` request in the app's metrics.
    With ``own_logging=False`` uvicorn's loggers go to the root logger's handlers (as set up
    by the caller, e.g. for JSON lines) instead of uvicorn's own.
    """
    open_files = raise_open_files_limit()
    metrics = getattr(app.state, "metrics", None)
    protocol = functools.partial(
        _GuardedProtocol,
        header_timeout=header_timeout,
        max_connections=max(1, min(max_connections, open_files - _SPARE_FILES)),
        on_refused=metrics.busy if isinstance(metrics, NodeMetrics) else None,
    )
    extra: dict[str, Any] = {} if own_logging else {"log_config": None}
    config = uvicorn.Config(
        app,
        http=protocol,  # type: ignore[arg-type]  # a protocol factory, as uvicorn calls it
        loop="asyncio",
        log_level=log_level,
        **extra,
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

    def __init__(
        self,
        *args: Any,
        header_timeout: float,
        max_connections: int,
        on_refused: Callable[[], None] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._max_connections = max_connections
        self._on_refused = on_refused
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
                if self._on_refused is not None:
                    self._on_refused()
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
