"""``HttpUpdateProvider``: the coordinator's side of a run against real nodes over HTTP(S).

Every round, all nodes are asked in parallel to train from the global parameters. Each answer
is checked before it can count: it must come in time and within the size limit, be a valid
update of the asked node for the asked round, carry a valid HMAC signature by that node's key
over the request's one-time nonce, and match the model (same keys and shapes, finite values).
Anything else is dropped with a log line on the ``aumai_fedtrain.network`` logger and earns no
credit. The round goes on with the updates that passed when there are at least ``min_nodes`` of
them; otherwise :class:`QuorumError` is raised before the coordinator changes anything, so the
last checkpoint stays as it was.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np

from aumai_fedtrain.coordinator import QuorumError
from aumai_fedtrain.models import FederatedNode, GlobalState, LocalUpdate, TensorMap, TrainingConfig
from aumai_fedtrain.network.auth import (
    NONCE_HEADER,
    SIGNATURE_HEADER,
    new_nonce,
    verify_update,
)
from aumai_fedtrain.network.wire import (
    DEFAULT_MAX_BODY_BYTES,
    JSON,
    SAFETENSORS,
    TrainRequest,
    WireError,
    decode_update,
    encode_request,
)
from aumai_fedtrain.providers.base import UpdateProvider
from aumai_fedtrain.verification import HashVerifier

__all__ = ["MAX_BACKOFF_SECONDS", "HttpUpdateProvider", "QuorumError"]

logger = logging.getLogger("aumai_fedtrain.network")

MAX_BACKOFF_SECONDS = 30.0
"""Longest wait before a retry, however many retries came before."""
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
_DETAIL_CHARS = 300
# Every attempt opens its own connection (so that _Deadline can find it); concurrency is
# bounded by max_workers.
_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=0)


class _Dropped(Exception):
    """A node's answer that does not count; ``retry`` when asking again may help."""

    def __init__(self, reason: str, retry: bool = False) -> None:
        super().__init__(reason)
        self.retry = retry


class HttpUpdateProvider(UpdateProvider):
    """Collects signed updates from live nodes (``aumai-fedtrain node``) over HTTP or HTTPS.

    Parameters
    ----------
    keys
        Each node's shared secret (node id -> key); every node of the run needs one.
    token
        The coordinator's bearer token, sent to every node (None sends none).
    ca_file
        PEM file of the certificate authority that signed the nodes' certificates; bare
        ``host:port`` addresses then use https. None uses the system's trusted authorities.
    min_nodes
        Quorum: fewer valid updates in a round raise :class:`QuorumError`.
    timeout
        Seconds one attempt at one node may take, training included; the attempt is cut off
        then, however slowly the node is still sending.
    retries
        How many times a node is asked again after a connection failure or a 429/502/503/504
        answer, waiting ``backoff * 2**attempt`` seconds (at most
        :data:`MAX_BACKOFF_SECONDS`) before each retry. A node that answers too late is a
        straggler and is not asked again in the round.
    backoff
        First retry delay in seconds.
    wire
        ``"binary"`` (safetensors bodies) or ``"json"`` (the user guide's JSON).
    max_response_bytes
        Largest answer accepted from a node (its body as sent: compressed answers are refused).
    model_init
        ``config -> initial global parameters`` (for nodes running the built-in trainer:
        :func:`aumai_fedtrain.simulation.initial_model`); None runs without a global model:
        the coordinator then only averages the updates, and nodes start every round from
        their own initial model.
    evaluator
        Optional ``parameters -> (loss, accuracy)`` of the global model on held-out data.
    max_workers
        How many nodes are asked at once.
    """

    def __init__(
        self,
        keys: Mapping[str, bytes],
        *,
        token: bytes | None = None,
        ca_file: str | Path | None = None,
        min_nodes: int = 1,
        timeout: float = 120.0,
        retries: int = 2,
        backoff: float = 0.5,
        wire: Literal["binary", "json"] = "binary",
        max_response_bytes: int = DEFAULT_MAX_BODY_BYTES,
        model_init: Callable[[TrainingConfig], TensorMap] | None = None,
        evaluator: Callable[[TensorMap], tuple[float, float]] | None = None,
        max_workers: int = 32,
    ) -> None:
        finite = math.isfinite(timeout) and math.isfinite(backoff)
        if not finite or min_nodes < 1 or timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(
                "need min_nodes >= 1, a finite timeout > 0, retries >= 0 and a finite "
                f"backoff >= 0 (got {min_nodes}, {timeout}, {retries}, {backoff})"
            )
        if max_workers < 1 or max_response_bytes < 1:
            raise ValueError(
                "need max_workers >= 1 and max_response_bytes >= 1 "
                f"(got {max_workers}, {max_response_bytes})"
            )
        if wire not in ("binary", "json"):
            raise ValueError(f"wire must be 'binary' or 'json', got {wire!r}")
        self.keys = dict(keys)
        self.token = token
        self.min_nodes = min_nodes
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.wire_format = SAFETENSORS if wire == "binary" else JSON
        self.max_response_bytes = max_response_bytes
        self.model_init = model_init
        self.evaluator = evaluator
        self.max_workers = max_workers
        self.failures: dict[int, dict[str, str]] = {}
        """Round -> node id -> why that node's update did not count."""
        # Made once: building a TLS context (for every client of every round) costs ~30 ms.
        self._tls = httpx.create_ssl_context()
        self._scheme = "http"
        if ca_file is not None:
            try:
                self._tls = ssl.create_default_context(cafile=str(ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot load the CA file {str(ca_file)!r}: {exc}") from None
            self._scheme = "https"
        self._hasher = HashVerifier()

    def initial_parameters(self, config: TrainingConfig) -> TensorMap | None:
        """The initial global model from ``model_init`` (None without one)."""
        return self.model_init(config) if self.model_init is not None else None

    def evaluate(self, parameters: TensorMap) -> tuple[float, float] | None:
        """Held-out loss and accuracy from ``evaluator``, or None without one."""
        return self.evaluator(parameters) if self.evaluator is not None else None

    def get_updates(
        self,
        round_id: int,
        state: GlobalState,
        nodes: list[FederatedNode],
    ) -> list[LocalUpdate]:
        """Ask every node to train from ``state.parameters``; return the updates that count.

        Raises :class:`QuorumError` when fewer than ``min_nodes`` valid updates arrive, and
        ``ValueError`` for a node without a key or an address, or a quorum above the nodes.
        """
        self._check_nodes(nodes)
        weights = state.parameters if state.parameters is not None else {}
        body = encode_request(
            TrainRequest(round_id=round_id, global_weights=weights), self.wire_format
        )
        headers = {
            "content-type": self.wire_format,
            "accept": self.wire_format,
            "accept-encoding": "identity",
        }
        if self.token is not None:
            headers["authorization"] = f"Bearer {self.token.decode('utf-8')}"
        timeout = httpx.Timeout(self.timeout)
        with (
            httpx.Client(verify=self._tls, timeout=timeout, limits=_LIMITS) as client,
            ThreadPoolExecutor(min(self.max_workers, len(nodes))) as pool,
        ):
            outcomes = list(
                pool.map(
                    lambda node: self._ask(client, node, round_id, body, headers, weights),
                    nodes,
                )
            )
        updates = [outcome for outcome in outcomes if isinstance(outcome, LocalUpdate)]
        failed = {
            node.node_id: outcome
            for node, outcome in zip(nodes, outcomes, strict=True)
            if isinstance(outcome, str)
        }
        self.failures[round_id] = failed
        if len(updates) < self.min_nodes:
            reasons = "; ".join(f"{node}: {reason}" for node, reason in failed.items())
            raise QuorumError(
                f"round {round_id}: {len(updates)} of {len(nodes)} nodes sent a valid update, "
                f"the quorum is {self.min_nodes} ({reasons})"
            )
        return updates

    def _check_nodes(self, nodes: list[FederatedNode]) -> None:
        for node in nodes:
            if node.node_id not in self.keys:
                raise ValueError(f"no key for node {node.node_id!r}")
            if not node.address:
                raise ValueError(f"node {node.node_id!r} has no address")
        if self.min_nodes > len(nodes):
            raise ValueError(f"min_nodes={self.min_nodes} but the run has {len(nodes)} nodes")

    def _url(self, address: str) -> str:
        base = address if "://" in address else f"{self._scheme}://{address}"
        return f"{base.rstrip('/')}/train"

    def _ask(
        self,
        client: httpx.Client,
        node: FederatedNode,
        round_id: int,
        body: bytes,
        headers: dict[str, str],
        weights: TensorMap,
    ) -> LocalUpdate | str:
        """The node's valid update, or why it does not count (logged)."""
        attempt = 0
        while True:
            nonce = new_nonce()
            try:
                update, signature = self._request(
                    client, node, body, {**headers, NONCE_HEADER: nonce}
                )
                self._check(update, signature, node, round_id, nonce, weights)
                return update
            except _Dropped as dropped:
                if not dropped.retry or attempt == self.retries:
                    logger.warning(
                        "round %d: no update from %s: %s", round_id, node.node_id, dropped
                    )
                    return str(dropped)
                # (The exponent is capped so that the product stays a finite float.)
                delay = min(self.backoff * 2 ** min(attempt, 32), MAX_BACKOFF_SECONDS)
                attempt += 1
                logger.info(
                    "round %d: %s failed (%s), retry %d/%d in %.2f s",
                    round_id,
                    node.node_id,
                    dropped,
                    attempt,
                    self.retries,
                    delay,
                )
            except Exception as exc:  # a bug met by one node's answer must not end the run
                logger.exception("round %d: cannot handle the answer of %s", round_id, node.node_id)
                return f"cannot handle the answer: {type(exc).__name__}: {exc}"
            time.sleep(delay)

    def _request(
        self, client: httpx.Client, node: FederatedNode, body: bytes, headers: dict[str, str]
    ) -> tuple[LocalUpdate, str | None]:
        """One attempt: the decoded update and its signature header."""
        url = self._url(node.address)
        with _Deadline(self.timeout) as deadline:
            try:
                with client.stream(
                    "POST", url, content=body, headers=headers, extensions={"trace": deadline.trace}
                ) as response:
                    content = self._read_limited(response)
            except httpx.TransportError as exc:
                if deadline.expired or isinstance(exc, httpx.TimeoutException):
                    # Not even connected in time: ask again; connected, then silent: a straggler.
                    retry = isinstance(exc, httpx.ConnectTimeout) or not deadline.connected
                    raise _Dropped(f"no answer within {self.timeout:g} s", retry=retry) from None
                # A certificate that does not verify will not verify on a retry either.
                raise _Dropped(f"cannot reach {url}: {exc}", retry=not _tls_failure(exc)) from None
        if response.status_code != httpx.codes.OK:
            detail = content[:_DETAIL_CHARS].decode("utf-8", "replace")
            raise _Dropped(
                f"HTTP {response.status_code}: {detail}",
                retry=response.status_code in _RETRY_STATUSES,
            )
        try:
            update = decode_update(content, response.headers.get("content-type", ""))
        except WireError as exc:
            raise _Dropped(f"malformed answer: {exc}") from None
        return update, response.headers.get(SIGNATURE_HEADER)

    def _read_limited(self, response: httpx.Response) -> bytes:
        """The answer's body as sent, refused as soon as it exceeds ``max_response_bytes``."""
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            # Decompressing would let a small answer grow past the limit in memory.
            raise _Dropped(f"answer has content-encoding {encoding!r}; only 'identity' is accepted")
        limit = self.max_response_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _Dropped(f"answer of {declared} bytes exceeds the limit of {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_raw():
            size += len(chunk)
            if size > limit:
                raise _Dropped(f"answer exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _check(
        self,
        update: LocalUpdate,
        signature: str | None,
        node: FederatedNode,
        round_id: int,
        nonce: str,
        weights: TensorMap,
    ) -> None:
        """Raise :class:`_Dropped` unless ``update`` is ``node``'s authentic, usable update."""
        if update.node_id != node.node_id:
            raise _Dropped(f"the answer is an update of node {update.node_id!r}")
        if update.round_id != round_id:
            raise _Dropped(
                f"replayed or stale update for round {update.round_id}, expected round {round_id}"
            )
        if signature is None:
            raise _Dropped(f"unsigned update (no {SIGNATURE_HEADER} header)")
        if not verify_update(self.keys[node.node_id], update, signature, nonce, self._hasher):
            raise _Dropped("bad signature: tampered with, or signed with another key")
        if weights and update.gradients.keys() != weights.keys():
            raise _Dropped(
                f"keys {sorted(update.gradients)} do not match the model's {sorted(weights)}"
            )
        for key, value in update.gradients.items():
            if weights and value.shape != weights[key].shape:
                raise _Dropped(
                    f"gradient {key!r} has shape {value.shape}, the model's is {weights[key].shape}"
                )
            if not np.isfinite(value).all():
                raise _Dropped(f"gradient {key!r} has non-finite values")


class _Deadline:
    """Cuts one attempt off after ``seconds``, however slowly the node sends its bytes.

    httpx's timeouts bound every single read, not a whole answer: a node sending a byte now and
    then would hold the round forever. The attempt's socket is learnt from httpcore's ``trace``
    extension and shut down when the time is up, which ends a blocked read at once.
    """

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self.connected = False
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()

    def trace(self, event: str, info: Mapping[str, Any]) -> None:
        """httpcore's trace hook: note the socket once connected (and after TLS, its wrapper)."""
        if event.endswith((".connect_tcp.complete", ".start_tls.complete")):
            with self._lock:
                self.connected = True
                self._socket = info["return_value"].get_extra_info("socket")
                if self.expired:
                    self._shut_down()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            self._shut_down()

    def _shut_down(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):  # already closed
                # socket.socket's own method: SSLSocket.shutdown would also drop its TLS state.
                socket.socket.shutdown(self._socket, socket.SHUT_RDWR)


def _tls_failure(error: BaseException) -> bool:
    """Whether ``error`` was caused by a TLS failure (e.g. an untrusted certificate)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False
