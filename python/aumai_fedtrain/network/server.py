"""The node: a Starlette app that trains one round per ``POST /train``, served by uvicorn.

``POST /train`` takes a :class:`~aumai_fedtrain.network.wire.TrainRequest` (JSON or
safetensors, by ``Content-Type``), runs the node's trainer from the global weights, and answers
the :class:`LocalUpdate` (JSON, or safetensors when ``Accept`` names it) with its HMAC
signature in the ``X-Fedtrain-Signature`` header. ``GET /health`` tells that the node is up.

Answers: 401 without a bearer token and 403 with a wrong one (when the node has a token), 413
for a body over the size limit, 415 for another content type, 400 for a malformed body, 422 for
weights the trainer cannot use, 500 when the trainer fails. Training runs in a worker thread,
one round at a time, so the node keeps answering while it trains.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from aumai_fedtrain.models import TensorMap, TrainingConfig
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
from aumai_fedtrain.trainer import NodeTrainer, TrainerFactory, TrainerResultError, as_update
from aumai_fedtrain.verification import HashVerifier

__all__ = ["NodeSettings", "create_app", "listen", "serve"]

logger = logging.getLogger("aumai_fedtrain.network")


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
    """

    node_id: str
    key: bytes = field(repr=False)
    trainer_factory: TrainerFactory
    config: TrainingConfig = field(default_factory=TrainingConfig)
    token: bytes | None = field(default=None, repr=False)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    trainer_name: str = "custom"


class _Node:
    """State and endpoints of one node.

    The trainer keeps its state across rounds. Before each round the node keeps a copy of that
    state, so a round asked again (a coordinator's retry) is redone from the same state; a
    round earlier than the last one trained (a new run) starts from a fresh trainer.
    """

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.rounds_trained = 0
        self._lock = threading.Lock()
        self._verifier = HashVerifier()
        self._trainer = self._new_trainer()
        self._last_round: int | None = None
        self._state_before_last_round: TensorMap = {}

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
        round_id = request.round_id
        with self._lock:
            self._prepare_round(round_id)
            try:
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
) -> None:
    """Serve the node on the listening socket ``sock`` until interrupted (SIGINT/SIGTERM)."""
    config = uvicorn.Config(
        create_app(settings),
        log_level=log_level,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run(sockets=[sock])
