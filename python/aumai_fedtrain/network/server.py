"""The node: a Starlette app that trains one round per ``POST /train``, served by uvicorn.

``POST /train`` takes a :class:`~aumai_fedtrain.network.wire.TrainRequest` (JSON or
safetensors, by ``Content-Type``), runs the node's trainer from the global weights, and answers
the :class:`LocalUpdate` (JSON, or safetensors when ``Accept`` names it) with its HMAC
signature in the ``X-Fedtrain-Signature`` header. A request that names a ``compression`` codec
is answered with the update compressed by it (:mod:`~aumai_fedtrain.network.compressed`,
signed over the body's bytes); with error feedback the residual is trainer state, kept with
the rest (and in ``state_dir``). ``GET /nonce`` hands out the one-time nonce
that a ``POST /train`` must be signed with (see :mod:`~aumai_fedtrain.network.auth`); ``GET
/health`` tells that the node is up. ``GET /metrics`` answers the node's counters in the
Prometheus text format (requests by outcome, training time, bytes in and out:
:class:`~aumai_fedtrain.observability.prometheus.NodeMetrics`), behind the metrics token when
the node has one, else behind its token.

Answers: 401 without a bearer token and 403 with a wrong one (when the node has a token), 401
for a request that is not signed with the node's key (unless the node allows unsigned
requests), 413 for a body over the size limit, 415 for another content type, 400 for a
malformed body, 422 for weights the trainer cannot use, 500 when the trainer fails. Training
runs in a worker thread, one round at a time, so the node keeps answering while it trains.

The server survives idle, half-open and stalled connections: a connection (or TLS handshake)
that has not sent a complete request head within ``header_timeout`` seconds is closed, and so
is one whose request body stops coming for ``body_timeout`` seconds; beyond
``max_connections`` a new connection takes the place of the one that has kept the node waiting
longest (for a head or a body), or is closed at once when every connection carries a complete
request; the soft limit of open files is raised to the hard one; and a log line repeated within
:data:`REPEAT_WINDOW_SECONDS` is shown once, with a count.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from aumai_fedtrain.compression import Codec, CompressingTrainer, Encoded
from aumai_fedtrain.models import CompressionConfig, LocalUpdate, TensorMap, TrainingConfig
from aumai_fedtrain.network.auth import (
    NODE_NONCE_HEADER,
    NONCE_HEADER,
    REQUEST_SIGNATURE_HEADER,
    ROUND_HEADER,
    SIGNATURE_HEADER,
    check_nonce,
    new_nonce,
    sign_body,
    sign_update,
    tokens_equal,
    verify_request,
)
from aumai_fedtrain.network.compressed import encode_compressed
from aumai_fedtrain.network.node_state import NodeState, load_node_state, save_node_state
from aumai_fedtrain.network.wire import (
    DEFAULT_MAX_BODY_BYTES,
    SAFETENSORS,
    NonceAnswer,
    TrainRequest,
    WireError,
    body_media_type,
    decode_request,
    encode_update,
    response_media_type,
)
from aumai_fedtrain.observability.prometheus import NodeMetrics
from aumai_fedtrain.trainer import (
    NodeTrainer,
    TrainerFactory,
    TrainerResultError,
    TrainResult,
    as_update,
)
from aumai_fedtrain.verification import HashVerifier

__all__ = [
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "MAX_OUTSTANDING_NONCES",
    "NONCE_LIFETIME_SECONDS",
    "REPEAT_WINDOW_SECONDS",
    "NodeSettings",
    "create_app",
    "listen",
    "serve",
]

logger = logging.getLogger("aumai_fedtrain.network")

DEFAULT_HEADER_TIMEOUT = 5.0
"""Seconds a connection may take to send a complete request head (or finish its TLS handshake)."""
DEFAULT_BODY_TIMEOUT = 5.0
"""Seconds a request body may stall (no byte received) before its connection is closed."""
DEFAULT_MAX_CONNECTIONS = 128
"""Most connections served at once."""
REPEAT_WINDOW_SECONDS = 10.0
"""A log line repeated within this many seconds is shown once, with a count."""
_SPARE_FILES = 64  # files a node needs besides its connections
_LOGGERS = ("", "asyncio", "uvicorn", "uvicorn.error", "uvicorn.access")
_MAX_REMEMBERED_LINES = 1024
NONCE_LIFETIME_SECONDS = 60.0
"""How long a nonce from ``GET /nonce`` stays valid, by the node's own clock."""
MAX_OUTSTANDING_NONCES = 4096
"""Most nonces handed out and not used yet; beyond, the oldest is forgotten."""
_ROUND_DIGITS = re.compile(r"[0-9]{1,30}")


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
        The node's training configuration, passed to the factory (its ``compression`` is not
        used: the codec is the one each train request names, the coordinator's).
    token
        The coordinator's bearer token; None accepts training requests from anyone.
    max_body_bytes
        Largest request body accepted (413 above).
    trainer_name
        How ``GET /health`` and the logs name the trainer.
    allow_unsigned_requests
        Also train on requests that carry no signature by ``key`` (the user guide's Pattern 3):
        anyone with the token (or anyone at all, without one) can then make the node train
        and reset its state. Signed requests are checked all the same.
    metrics_token
        The bearer token ``GET /metrics`` needs; None: the same as ``token``.
    state_dir
        Keep the trainer's state in this directory (see :mod:`~aumai_fedtrain.network.node_state`):
        loaded when the node starts, written after every round it trains.
    """

    node_id: str
    key: bytes = field(repr=False)
    trainer_factory: TrainerFactory
    config: TrainingConfig = field(default_factory=TrainingConfig)
    token: bytes | None = field(default=None, repr=False)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    trainer_name: str = "custom"
    allow_unsigned_requests: bool = False
    metrics_token: bytes | None = field(default=None, repr=False)
    state_dir: Path | None = None


@dataclass(frozen=True)
class _Signature:
    """What a signed request says in its headers (checked against its body later)."""

    round_id: int
    node_nonce: str
    signature: str


class _Nonces:
    """One-time nonces handed out by ``GET /nonce``: each is accepted once, within
    :data:`NONCE_LIFETIME_SECONDS` of the node's monotonic clock (no clock is shared with the
    coordinator); beyond :data:`MAX_OUTSTANDING_NONCES` the oldest is forgotten."""

    def __init__(self) -> None:
        self._issued: dict[str, float] = {}
        self._lock = threading.Lock()

    def issue(self) -> str:
        nonce = new_nonce()
        with self._lock:
            if len(self._issued) >= MAX_OUTSTANDING_NONCES:
                del self._issued[next(iter(self._issued))]
            self._issued[nonce] = time.monotonic()
        return nonce

    def use(self, nonce: str) -> bool:
        """Whether ``nonce`` was handed out, is fresh and unused; it is used up either way."""
        with self._lock:
            issued = self._issued.pop(nonce, None)
        return issued is not None and time.monotonic() - issued <= NONCE_LIFETIME_SECONDS


class _NodeTrainer(CompressingTrainer):
    """The node's trainer: it trains as the user's trainer does (the node checks the result
    before it compresses it), and keeps the error-feedback residual of the codec that the
    coordinator asks for in its state, as :class:`CompressingTrainer` does."""

    def train(self, round_id: int, parameters: TensorMap) -> TrainResult:
        """The user's trainer's result, uncompressed."""
        return self.trainer.train(round_id, parameters)

    def encode(self, gradients: TensorMap, compression: CompressionConfig) -> dict[str, Encoded]:
        """``gradients`` encoded by the ``compression`` codec (with the residual when its
        error feedback is on, which then keeps what this encoding lost)."""
        self.feedback.codec = Codec.of(compression)
        self.feedback.enabled = compression.error_feedback
        return self.feedback.encode(gradients)


class _Node:
    """State and endpoints of one node.

    The trainer keeps its state across rounds, and the node keeps a copy of the state before
    the last round it trained. A request for that round again (a coordinator's retry) is redone
    from that copy; an earlier round (a new run) starts from a fresh trainer; a later one goes
    on from the current state. A round whose training fails (an exception or an invalid
    result) leaves the trainer as it was before the request. Only requests signed with the
    node's key get that far (see :meth:`_check_signature`).
    """

    def __init__(self, settings: NodeSettings, metrics: NodeMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.rounds_trained = 0
        self._lock = threading.Lock()
        self._verifier = HashVerifier()
        self._nonces = _Nonces()
        self._trainer = self._new_trainer()
        self._last_round: int | None = None
        self._state_before_last_round: TensorMap = {}
        if settings.state_dir is not None:
            self._restore(settings.state_dir)

    def _restore(self, directory: Path) -> None:
        """Take up the state saved in ``directory`` by an earlier run of this node."""
        saved = load_node_state(directory, self.settings.node_id)
        if saved is None:
            return
        try:
            self._trainer.load_state_dict(saved.after)
        except Exception as exc:
            raise RuntimeError(
                f"the trainer cannot take up the state in {str(directory)!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self._last_round = saved.last_round
        self._state_before_last_round = saved.before
        logger.info("took up the trainer state after round %d from %s", saved.last_round, directory)

    def _save(self, round_id: int) -> None:
        """Write the trainer's state after ``round_id`` to the state directory, if any."""
        if self.settings.state_dir is None:
            return
        state = NodeState(round_id, self._state_before_last_round, self._trainer.state_dict())
        try:
            save_node_state(self.settings.state_dir, self.settings.node_id, state)
        except OSError as exc:
            logger.error("round %d: cannot save the node state: %s", round_id, exc)
            raise WireError(f"the node cannot save its state: {exc.strerror or exc}", 500) from None

    def _new_trainer(self) -> _NodeTrainer:
        node_id = self.settings.node_id
        try:
            return _NodeTrainer(
                self.settings.trainer_factory(node_id, self.settings.config), Codec(), node_id
            )
        except Exception as exc:
            raise RuntimeError(
                f"the trainer factory failed for node {self.settings.node_id!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    async def health(self, request: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "node_id": self.settings.node_id,
                "trainer": self.settings.trainer_name,
                "rounds_trained": self.rounds_trained,
            }
        )

    async def nonce(self, request: Request) -> Response:
        denied = _authorize(request.headers.get("authorization"), self.settings.token)
        if denied is not None:
            return denied
        return JSONResponse(NonceAnswer(nonce=self._nonces.issue()).model_dump())

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
        self.metrics.sent_bytes.inc(len(response.body))  # answers of every outcome
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
            signed = self._signature(request)
            body = await _read_body(request, self.settings.max_body_bytes, self.metrics)
            train_request = await run_in_threadpool(self._decode, body, content_type, nonce, signed)
            fmt = response_media_type(request.headers.get("accept"))
            if train_request.compression is not None:
                fmt = SAFETENSORS  # a compressed update has no JSON form
            content, signature = await run_in_threadpool(self._train, train_request, nonce, fmt)
        except WireError as exc:
            return _problem(str(exc), exc.status)
        except ClientDisconnect:  # (cut off by the body timeout, or gone): no one to answer
            return _problem("the client went away before its request was complete", 400)
        return Response(content, media_type=fmt, headers={SIGNATURE_HEADER: signature})

    def _signature(self, request: Request) -> _Signature | None:
        """The request's signature headers, its node nonce used up; 401 saying what is missing.

        None for an unsigned request that the node allows.
        """
        headers = request.headers
        signature = headers.get(REQUEST_SIGNATURE_HEADER)
        if signature is None:
            if self.settings.allow_unsigned_requests:
                return None
            raise WireError(
                f"unsigned request: {REQUEST_SIGNATURE_HEADER} is missing; this node trains "
                "only on requests signed with its key over a nonce from GET /nonce (or run it "
                "with --allow-unsigned-requests)",
                401,
            )
        node_nonce = headers.get(NODE_NONCE_HEADER)
        if node_nonce is None:
            raise WireError(
                f"{NODE_NONCE_HEADER} is missing: sign every request over a fresh nonce from "
                "GET /nonce",
                401,
            )
        if not self._nonces.use(node_nonce):
            raise WireError(
                f"unknown, expired or used {NODE_NONCE_HEADER}: get a fresh nonce from GET "
                f"/nonce for every request (it is valid for {NONCE_LIFETIME_SECONDS:g} s, once)",
                401,
            )
        round_text = headers.get(ROUND_HEADER, "")
        if _ROUND_DIGITS.fullmatch(round_text) is None:
            raise WireError(
                f"{ROUND_HEADER} must be the request's round id (decimal digits), got "
                f"{round_text[:40]!r}",
                401,
            )
        return _Signature(int(round_text), node_nonce, signature)

    def _decode(
        self, body: bytes, content_type: str, nonce: str, signed: _Signature | None
    ) -> TrainRequest:
        """The train request, once its signature (when it has one) verifies (else 401)."""
        if signed is not None and not verify_request(
            self.settings.key,
            self.settings.node_id,
            signed.round_id,
            signed.node_nonce,
            nonce,
            hashlib.sha256(body).hexdigest(),
            signed.signature,
        ):
            raise WireError(
                "bad request signature: not signed with the key of node "
                f"{self.settings.node_id!r}, or altered on the way",
                401,
            )
        request = decode_request(body, content_type)
        if signed is not None and request.round_id != signed.round_id:
            raise WireError(
                f"{ROUND_HEADER} says round {signed.round_id}, the body round {request.round_id}"
            )
        return request

    def _train(self, request: TrainRequest, nonce: str, fmt: str) -> tuple[bytes, str]:
        """Run the trainer (one round at a time), sign and encode the update."""
        _check_finite(request.global_weights)
        started = time.perf_counter()
        with self._lock:
            update, encoded = self._train_round(request)
            self._save(request.round_id)
            self.rounds_trained += 1
        if encoded is not None:
            content = encode_compressed(update, encoded)
            signature = sign_body(
                self.settings.key, update.node_id, update.round_id, content, nonce
            )
        else:
            content = encode_update(update, fmt)
            signature = sign_update(self.settings.key, update, nonce, self._verifier)
        logger.info(
            "round %d: trained on %d samples, loss %.6f (%.3f s)",
            update.round_id,
            update.samples_used,
            update.loss,
            time.perf_counter() - started,
        )
        return content, signature

    def _train_round(self, request: TrainRequest) -> tuple[LocalUpdate, dict[str, Encoded] | None]:
        """Train the request's round by the round policy (see the class doc), under the lock:
        the update, and its encoding when the request asks for compression.

        When training or encoding fails, the trainer, its state and the last round stay as
        they were.
        """
        round_id = request.round_id
        trainer, before = self._trainer, self._state_before_last_round
        restore: TensorMap | None
        if round_id == self._last_round:  # asked again: redo it from the state before it
            restore = _copy(trainer.state_dict())
            trainer.load_state_dict(_copy(before))
        elif self._last_round is not None and round_id < self._last_round:  # a new run
            try:
                trainer = self._new_trainer()
            except RuntimeError as exc:
                logger.error("round %d: %s", round_id, exc)
                raise WireError(str(exc), 500) from None
            restore = None  # the current trainer is not touched
            before = _copy(trainer.state_dict())
        else:
            restore = before = _copy(trainer.state_dict())
        try:
            update = self._run(trainer, round_id, request.global_weights)
            encoded = None
            if request.compression is not None:
                encoded = _encode(trainer, update, request.compression)
        except Exception:
            if restore is not None:
                trainer.load_state_dict(restore)
            raise
        if trainer is not self._trainer:
            logger.warning("round %d: a new run: fresh trainer state", round_id)
        self._trainer, self._state_before_last_round, self._last_round = trainer, before, round_id
        return update, encoded

    def _run(self, trainer: NodeTrainer, round_id: int, weights: TensorMap) -> LocalUpdate:
        """The trainer's update for ``round_id``, or :class:`WireError` (422 or 500)."""
        try:
            with self.metrics.training_seconds.time():
                result = trainer.train(round_id, weights)
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
        for key, value in update.gradients.items():
            if not np.isfinite(value).all():
                message = f"the trainer returned non-finite values in gradient {key!r}"
                logger.error("round %d: %s", round_id, message)
                raise WireError(message, 500)
        return update


def _encode(
    trainer: _NodeTrainer, update: LocalUpdate, compression: CompressionConfig
) -> dict[str, Encoded]:
    """The update's gradients encoded as the request asks, or :class:`WireError` (500)."""
    try:
        return trainer.encode(update.gradients, compression)
    except ValueError as exc:  # e.g. values beyond fp16's range
        message = f"cannot compress the update with {compression.codec}: {exc}"
        logger.error("round %d: %s", update.round_id, message)
        raise WireError(message, 500) from None


def _copy(state: TensorMap) -> TensorMap:
    return {key: np.array(value, copy=True) for key, value in state.items()}


_OUTCOMES = {
    200: "trained",
    401: "unauthorized",
    403: "unauthorized",
    400: "bad_request",
    413: "bad_request",
    415: "bad_request",
    422: "bad_request",
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
    """The node's ASGI application (``POST /train``, ``GET /nonce``, ``GET /health``,
    ``GET /metrics``).

    Its counters are ``app.state.metrics`` (a
    :class:`~aumai_fedtrain.observability.prometheus.NodeMetrics`).
    """
    metrics = NodeMetrics()
    node = _Node(settings, metrics)
    app = Starlette(
        routes=[
            Route("/train", node.train, methods=["POST"]),
            Route("/nonce", node.nonce, methods=["GET"]),
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
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    own_logging: bool = True,
) -> None:
    """Serve the node ``app`` (:func:`create_app`) on the listening socket ``sock`` until
    interrupted (SIGINT/SIGTERM).

    ``header_timeout``, ``body_timeout`` and ``max_connections`` bound idle and stalled
    connections (see the module doc); a connection refused for want of room is counted as a
    ``busy`` request in the app's metrics. With ``own_logging=False`` uvicorn's loggers go to
    the root logger's handlers (as set up by the caller, e.g. for JSON lines) instead of
    uvicorn's own.
    """
    open_files = raise_open_files_limit()
    metrics = getattr(app.state, "metrics", None)
    protocol = functools.partial(
        _GuardedProtocol,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
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
    """uvicorn's HTTP/1.1 protocol, closing connections that keep the node waiting.

    While the node waits for a request head, the client must complete it within
    ``header_timeout`` seconds; while it waits for a request body, the client must send some of
    it every ``body_timeout`` seconds (a body the node does not read meanwhile, e.g. while
    uvicorn holds it back, does not count against the client).
    """

    def __init__(
        self,
        *args: Any,
        header_timeout: float,
        body_timeout: float,
        max_connections: int,
        on_refused: Callable[[], None] | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._body_timeout = body_timeout
        self._max_connections = max_connections
        self._on_refused = on_refused
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self._max_connections:
            waiting = [
                connection
                for connection in self.connections
                if isinstance(connection, _GuardedProtocol) and connection._timer is not None
            ]
            if not waiting:  # every connection carries a complete request: no room
                self._refused = True
                transport.abort()
                if self._on_refused is not None:
                    self._on_refused()
                return
            min(waiting, key=lambda connection: connection._last_read).close_stalled()
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        self._last_read = self.loop.time()
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()  # for the next request's head, or the rest of a body left unread

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watching()
        if not self._refused:  # (a refused connection was never set up)
            super().connection_lost(exc)

    def close_stalled(self) -> None:
        """Close the connection, which has kept the node waiting too long."""
        self._stop_watching()
        if not self.transport.is_closing():
            self.transport.close()

    def _timeout(self) -> float | None:
        """How long the client may keep the node waiting now; None when it is not waited for."""
        if self.transport.is_closing():
            return None
        if self.conn.their_state is h11.SEND_BODY:
            return self._body_timeout
        if self.conn.their_state is h11.IDLE:  # a request head is due
            return self._header_timeout
        return None  # a complete request is being answered, or the connection is ending

    def _watch(self) -> None:
        """Start or stop the clock as the connection starts or stops waiting for its client."""
        timeout = self._timeout()
        if timeout is None:
            self._stop_watching()
        elif self._timer is None:
            self._last_read = self.loop.time()
            self._timer = self.loop.call_at(self._last_read + timeout, self._check)

    def _check(self) -> None:
        self._timer = None
        timeout = self._timeout()
        if timeout is None:
            return
        now = self.loop.time()
        if self.flow.read_paused:  # the node is not reading: the client is not to blame
            self._last_read = now
        elif now >= self._last_read + timeout:
            self.close_stalled()
            return
        self._timer = self.loop.call_at(self._last_read + timeout, self._check)

    def _stop_watching(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


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
            times = "time" if repeats == 1 else "times"
            record.msg = f"{record.getMessage()} (and {repeats} more {times} in "
            record.msg += f"{REPEAT_WINDOW_SECONDS:g} s)"
            record.args = None
        return True
