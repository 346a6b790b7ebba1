"""``HttpUpdateProvider``: the coordinator's side of a run against real nodes over HTTP(S).

Every round, the nodes are asked in parallel to train from the global parameters, within ONE
deadline for the whole round (resolving the node's name, connecting, TLS, retries and their
back-off, transfer and decoding). Each request is signed with the node's key over a one-time
nonce that the node handed out just before (``GET /nonce``), so that only this coordinator can
make it train.
Each answer is checked before it can count: it must come within the deadline and
the size an update of the model can have, be a valid update of the asked node for the asked
round, match the model's tensors (refused from a safetensors header before anything is
decoded) and carry a valid HMAC signature by that node's key over the request's one-time
nonce. Answers being read and decoded, and valid updates waiting to be folded into the
coordinator's mean, reserve their memory from a budget shared by the round.
Anything else is dropped (an info line on the ``aumai_fedtrain.network`` logger; the
coordinator warns once per round about the nodes dropped) and earns no credit. A node that
fails ``bench_after`` rounds in a row is benched: it is not asked, except for a probe after 1,
2, 4, ... rounds (at most :data:`MAX_PROBE_GAP_ROUNDS`), and is back as soon as it answers.
The round goes on with the updates that passed when there are at least ``min_nodes`` of them;
otherwise :class:`QuorumError` is raised before the coordinator changes anything, so the last
checkpoint stays as it was.

Every round is measured (:meth:`HttpUpdateProvider.round_stats`): the request bodies sent
(once per attempt whose body went out), the answer bodies read (error answers included), and
each asked node's answer time, from its first request to its last answer, retries included.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import math
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpcore
import httpx

from aumai_fedtrain.compression import Codec, EncodedUpdate
from aumai_fedtrain.coordinator import QuorumError
from aumai_fedtrain.models import (
    CompressionConfig,
    FederatedNode,
    GlobalState,
    LocalUpdate,
    TensorMap,
    TrainingConfig,
)
from aumai_fedtrain.network.auth import (
    NODE_NONCE_HEADER,
    NONCE_HEADER,
    REQUEST_SIGNATURE_HEADER,
    ROUND_HEADER,
    SIGNATURE_HEADER,
    SecretError,
    SignatureVersionError,
    check_token,
    new_nonce,
    sign_request,
    verify_body,
    verify_update,
)
from aumai_fedtrain.network.compressed import (
    CodecMismatchError,
    compressed_limit,
    read_compressed,
    read_compressed_update,
)
from aumai_fedtrain.network.nodes_file import check_address
from aumai_fedtrain.network.wire import (
    DEFAULT_MAX_BODY_BYTES,
    JSON,
    SAFETENSORS,
    Expected,
    ModelMismatchError,
    TrainRequest,
    WireError,
    count_values,
    decode_nonce,
    decode_update,
    decoded_bytes,
    encode_request,
    expected_tensors,
    max_update_bytes,
    media_type,
)
from aumai_fedtrain.providers.base import (
    Arrivals,
    RoundStats,
    UpdateProvider,
    updates_in_node_order,
)
from aumai_fedtrain.providers.in_process import NodeProgress
from aumai_fedtrain.screening import model_mismatch
from aumai_fedtrain.verification import HashVerifier

__all__ = [
    "MAX_BACKOFF_SECONDS",
    "MAX_PROBE_GAP_ROUNDS",
    "MAX_TIMEOUT_SECONDS",
    "MIN_MEMORY_BUDGET",
    "HttpUpdateProvider",
    "QuorumError",
]

logger = logging.getLogger("aumai_fedtrain.network")

MAX_BACKOFF_SECONDS = 30.0
"""Longest wait before a retry, however many retries came before."""
MAX_PROBE_GAP_ROUNDS = 32
"""Most rounds a benched node sits out between two probes."""
MAX_TIMEOUT_SECONDS = 86_400.0
"""Longest deadline of a round (one day)."""
MIN_MEMORY_BUDGET = 1024**3
"""Smallest default memory budget of a round (see ``memory_budget``)."""
_RETRY_STATUSES = frozenset({429, 502, 503, 504})
_DETAIL_CHARS = 300
_NONCE_ANSWER_BYTES = 1024
_HEADERS_TOO_LARGE = "Receive buffer too long"  # (h11's words for an overlong answer head)
_PROBE_SECONDS = 5.0
# Every attempt opens its own connection (so that the deadline can find it); concurrency is
# bounded by max_workers.
_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=0)
# Memory, per byte of an answer's body or per value, that decoding and checking it may take
# (measured: parsing JSON peaks at ~80 bytes per float64; safetensors decodes into one copy;
# the signature's wire digest reads the values in place).
_JSON_BYTES_PER_BODY_BYTE = 3
_JSON_BYTES_PER_ITEM = 96
_JSON_BYTES_PER_BODY_BYTE_UNKNOWN_MODEL = 64


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
        The bearer token sent to the nodes without one of their own in ``tokens`` (None sends
        none).
    tokens
        Per-node bearer tokens (node id -> token), so that one leaked token opens one node.
    ca_file
        PEM file of the certificate authority that signed the nodes' certificates; bare
        ``host:port`` addresses then use https. None uses the system's trusted authorities.
    min_nodes
        Quorum: fewer valid updates in a round raise :class:`QuorumError`.
    timeout
        The round's deadline in seconds (at most :data:`MAX_TIMEOUT_SECONDS`): connecting, TLS
        handshakes, training, retries and their back-off, and the transfer of every answer
        must fit in it. A round takes at most this plus the decoding and checking of the
        answers already in.
    retries
        How many times a node is asked again after a connection failure or a 429/502/503/504
        answer, waiting ``backoff * 2**attempt`` seconds (at most :data:`MAX_BACKOFF_SECONDS`)
        before each retry, as long as the wait ends before the deadline. A node that answers
        too late is a straggler and is not asked again in the round.
    backoff
        First retry delay in seconds (at most :data:`MAX_BACKOFF_SECONDS`).
    wire
        ``"binary"`` (safetensors bodies) or ``"json"`` (the user guide's JSON).
    max_response_bytes
        Largest answer accepted from a node (its body as sent: HTTP content encodings are
        refused); answers larger than an update of the model can be are refused too (with
        compression: than the codes and scales of the model's update, plus a bounded header).
    memory_budget
        Bytes that the answers being read, decoded and checked at once may take; an answer waits
        (within the deadline) for its share, and one that alone needs more is refused. None: twice
        what the largest valid answer needs, at least :data:`MIN_MEMORY_BUDGET`. An update handed to
        the coordinator by :meth:`iter_updates` keeps its size (a compressed one's codes and scales:
        it is never decoded) counted while it waits in the coordinator's reorder buffer, until it is
        folded into the mean, but never makes an answer wait (see :class:`_MemoryBudget`: a slow
        early node must not starve the others); the list that :meth:`get_updates` returns is outside
        the budget (as are the updates that a robust rule or norm clipping collects).
    bench_after
        After this many failed rounds in a row a node is benched (see the module doc).
    model_init
        ``config -> initial global parameters`` (for nodes running the built-in trainer:
        :func:`aumai_fedtrain.simulation.initial_model`); None runs without a global model:
        the coordinator then only averages the updates, and nodes start every round from
        their own initial model.
    evaluator
        Optional ``parameters -> (loss, accuracy)`` of the global model on held-out data.
    max_workers
        How many nodes are asked at once.
    on_node_done
        Optional progress hook, called as ``(nodes_done, nodes_asked)`` as each asked node's
        answer is settled.
    """

    def __init__(
        self,
        keys: Mapping[str, bytes],
        *,
        token: bytes | None = None,
        tokens: Mapping[str, bytes] | None = None,
        ca_file: str | Path | None = None,
        min_nodes: int = 1,
        timeout: float = 120.0,
        retries: int = 2,
        backoff: float = 0.5,
        wire: Literal["binary", "json"] = "binary",
        max_response_bytes: int = DEFAULT_MAX_BODY_BYTES,
        memory_budget: int | None = None,
        bench_after: int = 3,
        model_init: Callable[[TrainingConfig], TensorMap] | None = None,
        evaluator: Callable[[TensorMap], tuple[float, float]] | None = None,
        max_workers: int = 32,
        on_node_done: NodeProgress | None = None,
    ) -> None:
        if not (math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT_SECONDS):
            raise ValueError(
                f"need a finite timeout > 0 of at most {MAX_TIMEOUT_SECONDS:g} s (one day), "
                f"got {timeout:g}"
            )
        if not (math.isfinite(backoff) and 0 <= backoff <= MAX_BACKOFF_SECONDS):
            raise ValueError(
                f"need a finite backoff >= 0 of at most {MAX_BACKOFF_SECONDS:g} s, got {backoff:g}"
            )
        if min_nodes < 1 or retries < 0:
            raise ValueError(f"need min_nodes >= 1 and retries >= 0 (got {min_nodes}, {retries})")
        if max_workers < 1 or max_response_bytes < 1 or bench_after < 1:
            raise ValueError(
                "need max_workers >= 1, max_response_bytes >= 1 and bench_after >= 1 "
                f"(got {max_workers}, {max_response_bytes}, {bench_after})"
            )
        if memory_budget is not None and memory_budget < 1:
            raise ValueError(f"memory_budget must be at least 1 byte, got {memory_budget}")
        if wire not in ("binary", "json"):
            raise ValueError(f"wire must be 'binary' or 'json', got {wire!r}")
        self.keys = dict(keys)
        self.tokens = {
            node_id: _header_token(value, f"token of node {node_id!r}")
            for node_id, value in (tokens or {}).items()
        }
        self.token = None if token is None else _header_token(token, "token")
        self.min_nodes = min_nodes
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.wire_format = SAFETENSORS if wire == "binary" else JSON
        self.max_response_bytes = max_response_bytes
        self.memory_budget = memory_budget
        self.model_init = model_init
        self.evaluator = evaluator
        self.max_workers = max_workers
        self.on_node_done = on_node_done
        self.failures: dict[int, dict[str, str]] = {}
        """Round -> node id -> why that node's update did not count."""
        self._bench = _Bench(bench_after)
        self._stats: dict[int, RoundStats] = {}
        # Made once: building a TLS context (for every client of every round) costs ~30 ms.
        self._tls = httpx.create_ssl_context()
        self._has_ca_file = ca_file is not None
        if ca_file is not None:
            try:
                self._tls = ssl.create_default_context(cafile=str(ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot load the CA file {str(ca_file)!r}: {exc}") from None
        self._hasher = HashVerifier()

    def configure(self, config: TrainingConfig) -> None:
        """Take the run's config; its ``compression`` codec is asked of the nodes, which needs
        the global model (``model_init``) to decode their answers, else ``ValueError``."""
        if config.compression.codec != "none" and self.model_init is None:
            raise ValueError(
                f"compression codec {config.compression.codec!r} needs the global model to "
                "decode the nodes' updates: give the provider a model_init (or use codec 'none')"
            )
        super().configure(config)

    def initial_parameters(self, config: TrainingConfig) -> TensorMap | None:
        """The initial global model from ``model_init`` (None without one)."""
        return self.model_init(config) if self.model_init is not None else None

    def evaluate(self, parameters: TensorMap) -> tuple[float, float] | None:
        """Held-out loss and accuracy from ``evaluator``, or None without one."""
        return self.evaluator(parameters) if self.evaluator is not None else None

    def round_failures(self, round_id: int) -> dict[str, str]:
        """The nodes whose update for ``round_id`` did not count, with why (benched ones too)."""
        return dict(self.failures.get(round_id, {}))

    def round_stats(self, round_id: int) -> RoundStats | None:
        """Bytes sent and received, answer times and benched nodes of ``round_id`` (the last
        round asked)."""
        return self._stats.get(round_id)

    def get_updates(
        self,
        round_id: int,
        state: GlobalState,
        nodes: list[FederatedNode],
    ) -> list[LocalUpdate]:
        """Ask the nodes to train from ``state.parameters`` (benched ones only to probe them,
        or when the quorum cannot be reached without them).

        Returns the updates that count, in the order of ``nodes`` (held outside the memory
        budget). Raises :class:`QuorumError` when fewer than ``min_nodes`` valid updates
        arrive, and ``ValueError`` for a node without a key or an address, or a quorum above
        the nodes.
        """
        updates = updates_in_node_order(self.iter_updates(round_id, state, nodes), nodes)
        return [
            update.decoded() if isinstance(update, EncodedUpdate) else update for update in updates
        ]

    def iter_updates(
        self,
        round_id: int,
        state: GlobalState,
        nodes: list[FederatedNode],
    ) -> Iterator[Arrivals]:
        """:meth:`get_updates`, each valid update handed over as soon as it is read, decoded
        and checked, each node that will send none (benched, failed) as soon as that is known.

        Each update handed over keeps its size reserved in the round's memory budget (a compressed
        answer's: its codes and scales, handed over still encoded as an
        :class:`~aumai_fedtrain.compression.EncodedUpdate`) until the coordinator releases it
        (:attr:`Arrivals.release`: folded into the mean or refused); the answer of the first node of
        ``nodes`` still pending may use the bytes that such waiting updates hold, so that the
        updates waiting for it never keep it out.
        """
        self._check_nodes(nodes)
        deadline = _RoundDeadline(self.timeout)
        weights = state.parameters if state.parameters is not None else {}
        compression = self._compression()
        body = encode_request(
            TrainRequest(round_id=round_id, global_weights=weights, compression=compression),
            self.wire_format,
        )
        codec = Codec.of(compression) if compression is not None else None
        if codec is not None and not weights:
            raise ValueError(f"round {round_id}: compressed updates need the global parameters")
        expected = expected_tensors(weights) if weights else None
        asked, sitting_out = self._bench.split(round_id, nodes)
        if len(asked) < self.min_nodes:  # the quorum needs the benched nodes: probe them all
            asked, sitting_out = nodes, {}
        budget = _MemoryBudget(
            self.memory_budget if self.memory_budget is not None else self.default_budget(weights)
        )
        if sitting_out:
            yield Arrivals([], silent=list(sitting_out))
        digest = hashlib.sha256(body).hexdigest()
        round_ = _Round(
            round_id,
            body,
            digest,
            weights,
            expected,
            codec,
            deadline,
            budget,
            _Progress(len(asked)),
        )
        answers: queue.SimpleQueue[tuple[FederatedNode, _Answer | BaseException]]
        answers = queue.SimpleQueue()

        def ask(node: FederatedNode) -> None:
            try:
                answers.put((node, self._ask(client, node, round_)))
            except BaseException as exc:  # handed to the round's thread, which raises it
                answers.put((node, exc))

        outcomes: dict[str, str | None] = {}
        traffics: dict[str, _Traffic] = {}
        with (
            deadline,
            _client(self._tls, deadline) as client,
            ThreadPoolExecutor(min(self.max_workers, max(1, len(asked)))) as pool,
        ):
            try:
                for node in asked:
                    pool.submit(ask, node)
                for _ in asked:
                    node, answer = answers.get()
                    if isinstance(answer, BaseException):
                        raise answer
                    outcome, traffics[node.node_id] = answer
                    if isinstance(outcome, str):
                        outcomes[node.node_id] = outcome
                        yield Arrivals([], silent=[node.node_id])
                    else:
                        outcomes[node.node_id] = None
                        yield Arrivals([outcome], release=budget.held(node.node_id))
                    del answer, outcome
            except BaseException:
                # The round is abandoned (an error here or in the coordinator, which closed
                # this generator): ask no one else and end every open connection now.
                pool.shutdown(wait=False, cancel_futures=True)
                deadline.expire()
                raise
        self._stats = {
            round_id: RoundStats(
                bytes_to_nodes=sum(traffics[node.node_id].sent for node in asked),
                bytes_from_nodes=sum(traffics[node.node_id].received for node in asked),
                node_seconds={node.node_id: traffics[node.node_id].seconds for node in asked},
                time_kind="answer",
                benched=list(sitting_out),
            )
        }
        failed = {
            node.node_id: reason for node in asked if (reason := outcomes[node.node_id]) is not None
        }
        counted = len(asked) - len(failed)
        self._bench.record(round_id, [node.node_id for node in asked], failed)
        failed.update(sitting_out)
        self.failures[round_id] = {
            node.node_id: failed[node.node_id] for node in nodes if node.node_id in failed
        }
        if counted < self.min_nodes:
            reasons = "; ".join(f"{node}: {reason}" for node, reason in failed.items())
            raise QuorumError(
                f"round {round_id}: {counted} of {len(nodes)} nodes sent a valid update, "
                f"the quorum is {self.min_nodes} ({reasons})"
            )

    def _compression(self) -> CompressionConfig | None:
        """The compression the nodes are asked for (None: they send uncompressed updates)."""
        if self.config is None or self.config.compression.codec == "none":
            return None
        return self.config.compression

    def default_budget(self, weights: TensorMap) -> int:
        """The default ``memory_budget`` for a model: room for two of its largest answers."""
        if not weights:
            return MIN_MEMORY_BUDGET
        compression = self._compression()
        if compression is not None:
            need = _compressed_reservation(compressed_limit(weights, Codec.of(compression)))
        else:
            largest = max_update_bytes(expected_tensors(weights), self.wire_format)
            need = self.answer_memory(self.wire_format, largest, weights)
        return max(MIN_MEMORY_BUDGET, 2 * need)

    def answer_memory(self, fmt: str, body_bytes: int, weights: TensorMap) -> int:
        """Bytes of the memory budget that an answer of ``body_bytes`` in ``fmt`` reserves.

        ``weights`` is the model (empty when unknown: then only the body's size counts).
        """
        return self._reservation(fmt, body_bytes, expected_tensors(weights) if weights else None)

    def _check_nodes(self, nodes: list[FederatedNode]) -> None:
        for node in nodes:
            if node.node_id not in self.keys:
                raise ValueError(f"no key for node {node.node_id!r}")
            if not node.address:
                raise ValueError(f"node {node.node_id!r} has no address")
            try:
                check_address(node.address)
            except ValueError as exc:
                raise ValueError(f"node {node.node_id!r} has an invalid address: {exc}") from None
        if self.min_nodes > len(nodes):
            raise ValueError(f"min_nodes={self.min_nodes} but the run has {len(nodes)} nodes")

    def _base_url(self, address: str) -> str:
        scheme = "https" if self._has_ca_file else "http"
        base = address if "://" in address else f"{scheme}://{address}"
        return base.rstrip("/")

    def _authorization(self, node: FederatedNode) -> dict[str, str]:
        token = self.tokens.get(node.node_id, self.token)
        return {"authorization": f"Bearer {token}"} if token is not None else {}

    def _headers(
        self, node: FederatedNode, round_: _Round, nonce: str, node_nonce: str
    ) -> dict[str, str]:
        signature = sign_request(
            self.keys[node.node_id],
            node.node_id,
            round_.round_id,
            node_nonce,
            nonce,
            round_.body_sha256,
        )
        return {
            "content-type": self.wire_format,
            "content-length": str(len(round_.body)),
            "accept": SAFETENSORS if round_.codec is not None else self.wire_format,
            "accept-encoding": "identity",
            NONCE_HEADER: nonce,
            NODE_NONCE_HEADER: node_nonce,
            ROUND_HEADER: str(round_.round_id),
            REQUEST_SIGNATURE_HEADER: signature,
            **self._authorization(node),
        }

    def _ask(self, client: httpx.Client, node: FederatedNode, round_: _Round) -> _Answer:
        """The node's valid update, or why it does not count, with the bytes and time it took."""
        traffic = _Traffic()
        started = time.monotonic()
        outcome = self._settle(client, node, round_, traffic)
        traffic.seconds = time.monotonic() - started
        if self.on_node_done is not None:
            self.on_node_done(round_.progress.one_done(), round_.progress.total)
        return outcome, traffic

    def _settle(
        self, client: httpx.Client, node: FederatedNode, round_: _Round, traffic: _Traffic
    ) -> LocalUpdate | str:
        """The node's valid update, or why it does not count (logged at info level; a probe
        of a benched node is asked once)."""
        attempt = 0
        retries = 0 if self._bench.benched(node.node_id) else self.retries
        while True:
            nonce = new_nonce()
            try:
                return self._attempt(client, node, round_, nonce, traffic)
            except _Dropped as dropped:
                reason = str(dropped)
                if not dropped.retry or attempt == retries:
                    break
                # (The exponent is capped so that the product stays a finite float.)
                delay = min(self.backoff * 2 ** min(attempt, 32), MAX_BACKOFF_SECONDS)
                if delay >= round_.deadline.remaining():
                    reason += f" (no time left to retry within the {self.timeout:g} s deadline)"
                    break
                attempt += 1
                logger.info(
                    "round %d: %s failed (%s), retry %d/%d in %.2f s",
                    round_.round_id,
                    node.node_id,
                    dropped,
                    attempt,
                    retries,
                    delay,
                )
            except Exception as exc:  # a bug met by one node's answer must not end the run
                logger.exception(
                    "round %d: cannot handle the answer of %s", round_.round_id, node.node_id
                )
                return f"cannot handle the answer: {type(exc).__name__}: {exc}"
            round_.deadline.sleep(delay)
        # (At info level: the coordinator warns once per round about every node dropped.)
        logger.info("round %d: no update from %s: %s", round_.round_id, node.node_id, reason)
        return reason

    def _attempt(
        self,
        client: httpx.Client,
        node: FederatedNode,
        round_: _Round,
        nonce: str,
        traffic: _Traffic,
    ) -> LocalUpdate:
        """One request (a nonce from the node, then the signed ``POST /train``): the node's
        valid update, or :class:`_Dropped` saying why not."""
        base = self._base_url(node.address)
        url = f"{base}/train"
        deadline = round_.deadline
        too_late = _Dropped(f"no answer within {self.timeout:g} s")
        if deadline.remaining() <= 0:
            raise too_late
        with deadline.attempt() as attempt:
            try:
                with client.stream(
                    "GET",
                    f"{base}/nonce",
                    headers=self._authorization(node),
                    timeout=deadline.remaining(),
                    extensions={"trace": attempt.trace},
                ) as response:
                    node_nonce = self._node_nonce(response, node)
                remaining = deadline.remaining()
                if remaining <= 0:
                    raise too_late
                attempt.body_sent = False  # (the nonce request's empty body set it)
                with client.stream(
                    "POST",
                    url,
                    content=_body_slices(round_.body),
                    headers=self._headers(node, round_, nonce, node_nonce),
                    timeout=remaining,
                    extensions={"trace": attempt.trace},
                ) as response:
                    return self._receive(response, node, round_, nonce, traffic)
            except httpx.TransportError as exc:
                if isinstance(exc.__cause__, _ResolveTimeout):
                    looked_up = exc.__cause__.host
                    raise _Dropped(
                        f"{too_late} (resolving {looked_up} did not end in time)"
                    ) from None
                # (httpx's timeouts are the time left: a timeout is the deadline too.)
                if deadline.expired or isinstance(exc, httpx.TimeoutException):
                    raise too_late from None
                raise self._unreachable(url, exc, deadline) from None
            finally:
                if attempt.body_sent:
                    traffic.sent += len(round_.body)

    def _node_nonce(self, response: httpx.Response, node: FederatedNode) -> str:
        """The one-time nonce in the node's answer to ``GET /nonce``."""
        if response.status_code in (httpx.codes.NOT_FOUND, httpx.codes.METHOD_NOT_ALLOWED):
            raise _Dropped(
                f"the node hands out no nonce (GET /nonce: HTTP {response.status_code}): it runs "
                "an older version than this coordinator; upgrade it"
            )
        self._check_status(response, node)
        try:
            return decode_nonce(_read_limited(response, _NONCE_ANSWER_BYTES, None))
        except WireError as exc:
            raise _Dropped(f"malformed answer to GET /nonce: {exc}") from None

    def _check_status(
        self, response: httpx.Response, node: FederatedNode, traffic: _Traffic | None = None
    ) -> None:
        """Raise :class:`_Dropped` with the node's reason unless it answered 200 (the bytes of
        a ``POST /train`` answer read count in ``traffic``)."""
        if response.status_code == httpx.codes.OK:
            return
        if response.status_code == httpx.codes.UNAUTHORIZED and not self._authorization(node):
            raise _Dropped(
                f"node {node.node_id} requires a token: give it a token_file in the nodes file "
                "or --token-file"
            )
        detail = _read_some(response, _DETAIL_CHARS, traffic).decode("utf-8", "replace")
        if response.status_code == httpx.codes.UNAUTHORIZED and "bad request signature" in detail:
            raise _Dropped(
                f"bad request signature: {node.node_id} does not hold the key this coordinator "
                f"has for it: check both key files (HTTP 401: {detail})"
            )
        raise _Dropped(
            f"HTTP {response.status_code}: {detail}",
            retry=response.status_code in _RETRY_STATUSES,
        )

    def _receive(
        self,
        response: httpx.Response,
        node: FederatedNode,
        round_: _Round,
        nonce: str,
        traffic: _Traffic,
    ) -> LocalUpdate:
        """Read, decode and check an answer within its share of the memory budget."""
        self._check_status(response, node, traffic)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            # Decompressing would let a small answer grow past the limit in memory.
            raise _Dropped(f"answer has content-encoding {encoding!r}; only 'identity' is accepted")
        fmt = media_type(response.headers.get("content-type"))
        if round_.codec is not None:
            return self._receive_compressed(
                response, fmt, node, round_, round_.codec, nonce, traffic
            )
        limit = self.max_response_bytes
        if round_.expected is not None and fmt in (JSON, SAFETENSORS):
            limit = min(limit, max_update_bytes(round_.expected, fmt))
        size = _declared_size(response, limit)
        reservation = self._reservation(fmt, size, round_.expected)
        with round_.budget.reserve(node.node_id, reservation, round_.deadline) as held:
            content = _read_limited(response, limit, traffic)
            try:
                update = decode_update(content, fmt, round_.expected)
            except ModelMismatchError as exc:
                raise _Dropped(str(exc)) from None
            except WireError as exc:
                raise _Dropped(f"malformed answer: {exc}") from None
            del content
            self._check(update, response.headers.get(SIGNATURE_HEADER), node, round_, nonce)
            # The update stays in memory until the coordinator folds it: its bytes stay held.
            held.keep(update.nbytes)
        return update

    def _receive_compressed(
        self,
        response: httpx.Response,
        fmt: str,
        node: FederatedNode,
        round_: _Round,
        codec: Codec,
        nonce: str,
        traffic: _Traffic,
    ) -> LocalUpdate:
        """Read and check a compressed answer within its share of the memory budget: its size
        (by the model's codes and scales), header (codec, block size, tensors), node and round,
        and its signature over the bytes received are checked before its codes and scales are
        read out (never decoded: the coordinator dequantises them inside its mean)."""
        if fmt != SAFETENSORS:
            raise _Dropped(
                f"answer of content type {fmt or '(none)'!r}: this run's updates travel "
                f"compressed with {codec.name}, as {SAFETENSORS!r}"
            )
        assert round_.expected is not None  # (a compressed round has the global parameters)
        limit = min(self.max_response_bytes, compressed_limit(round_.model, codec))
        size = _declared_size(response, limit)
        reservation = _compressed_reservation(size)
        with round_.budget.reserve(node.node_id, reservation, round_.deadline) as held:
            content = _read_limited(response, limit, traffic)
            try:
                metadata = read_compressed(content, round_.model, codec)
            except CodecMismatchError as exc:
                raise _Dropped(str(exc)) from None
            except WireError as exc:
                raise _Dropped(f"malformed compressed answer: {exc}") from None
            _check_sender(
                metadata.get("node_id"), _int_or_none(metadata.get("round_id")), node, round_
            )
            signature, key = _signature_of(response), self.keys[node.node_id]
            try:
                valid = verify_body(key, node.node_id, round_.round_id, content, signature, nonce)
            except SignatureVersionError as exc:
                raise _Dropped(str(exc)) from None
            if not valid:
                raise _Dropped(_BAD_SIGNATURE)
            try:
                update = read_compressed_update(content, round_.model, metadata)
            except WireError as exc:
                raise _Dropped(f"malformed compressed answer: {exc}") from None
            del content
            held.keep(update.nbytes)
        return update

    def _reservation(self, fmt: str, size: int, expected: Expected | None) -> int:
        """Bytes that reading, decoding and checking an answer of ``size`` bytes may take."""
        values, lists = count_values(expected) if expected is not None else (size, 0)
        if fmt == JSON:
            if expected is None:
                need = size * _JSON_BYTES_PER_BODY_BYTE_UNKNOWN_MODEL
            else:
                need = size * _JSON_BYTES_PER_BODY_BYTE + (values + lists) * _JSON_BYTES_PER_ITEM
        else:
            need = size + decoded_bytes(expected) if expected is not None else 2 * size
        return need

    def _unreachable(
        self, url: str, error: httpx.TransportError, deadline: _RoundDeadline
    ) -> _Dropped:
        """Why the node at ``url`` could not be asked, saying so when TLS is on one side only."""
        if isinstance(error, httpx.RemoteProtocolError) and _HEADERS_TOO_LARGE in str(error):
            return _Dropped(f"answer headers too large (from {url})")  # not worth a retry
        address = httpx.URL(url)
        tls_failure = _tls_failure(error)
        plain_to_tls = address.scheme == "http" and isinstance(
            error, httpx.RemoteProtocolError | httpx.ReadError
        )
        tls_to_plain = address.scheme == "https" and tls_failure and not _certificate_failure(error)
        if plain_to_tls and _speaks_tls(address, deadline) is True:
            return _Dropped(
                "node speaks TLS: pass --ca-file (ca_file=), or write https:// in its address "
                f"(asked over plain HTTP: {url})"
            )
        if tls_to_plain and _speaks_tls(address, deadline) is False:
            return _Dropped(
                "node speaks plain HTTP, not TLS: write http:// in its address, or serve it "
                f"with --ssl-certfile/--ssl-keyfile (asked over TLS: {url})"
            )
        # A certificate that does not verify will not verify on a retry either.
        return _Dropped(f"cannot reach {url}: {error}", retry=not tls_failure)

    def _check(
        self,
        update: LocalUpdate,
        signature: str | None,
        node: FederatedNode,
        round_: _Round,
        nonce: str,
    ) -> None:
        """Raise :class:`_Dropped` unless ``update`` is ``node``'s authentic update."""
        _check_sender(update.node_id, update.round_id, node, round_)
        if signature is None:
            raise _Dropped(_UNSIGNED)
        if round_.expected is not None:  # (before hashing: a JSON body has no header to check)
            shapes = {key: value.shape for key, value in update.gradients.items()}
            problem = model_mismatch(shapes, round_.expected)
            if problem is not None:
                raise _Dropped(problem)
        try:
            valid = verify_update(self.keys[node.node_id], update, signature, nonce, self._hasher)
        except SignatureVersionError as exc:
            raise _Dropped(str(exc)) from None
        if not valid:
            raise _Dropped(_BAD_SIGNATURE)


_UNSIGNED = f"unsigned update (no {SIGNATURE_HEADER} header)"
_BAD_SIGNATURE = "bad signature: tampered with, or signed with another key"


def _check_sender(
    node_id: str | None, round_id: int | None, node: FederatedNode, round_: _Round
) -> None:
    """Raise :class:`_Dropped` unless an answer's node and round are the asked ones."""
    if node_id != node.node_id:
        raise _Dropped(f"the answer is an update of node {node_id!r}")
    if round_id != round_.round_id:
        raise _Dropped(
            f"replayed or stale update for round {round_id}, expected round {round_.round_id}"
        )


def _signature_of(response: httpx.Response) -> str:
    """The answer's signature header, or :class:`_Dropped` when it has none."""
    signature: str | None = response.headers.get(SIGNATURE_HEADER)
    if signature is None:
        raise _Dropped(_UNSIGNED)
    return signature


def _compressed_reservation(size: int) -> int:
    """Bytes that reading a compressed answer of ``size`` bytes may take: the body, and the
    codes and scales read out of it (no more: they are never decoded here)."""
    return 2 * size


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def _declared_size(response: httpx.Response, limit: int) -> int:
    """The answer's declared length (``limit`` when it declares none); :class:`_Dropped` when
    it exceeds ``limit``."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _Dropped(f"answer of {declared} bytes exceeds the limit of {limit} bytes")
    return int(declared) if declared.isdigit() else limit


_Answer = tuple[LocalUpdate | str, "_Traffic"]
"""A node's valid update or why it does not count, and its exchange."""


@dataclass
class _Traffic:
    """One node's exchange in a round: bytes each way and its answer time."""

    sent: int = 0
    received: int = 0
    seconds: float = 0.0


class _Progress:
    """How many asked nodes of a round have settled (counted from the pool's threads)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._done = 0
        self._lock = threading.Lock()

    def one_done(self) -> int:
        """Count one more settled node; the count so far."""
        with self._lock:
            self._done += 1
            return self._done


@dataclass(frozen=True)
class _Round:
    """What every node's request in a round shares."""

    round_id: int
    body: bytes
    body_sha256: str
    model: TensorMap
    expected: Expected | None
    codec: Codec | None
    """The codec the nodes compress their updates with (None: uncompressed)."""
    deadline: _RoundDeadline
    budget: _MemoryBudget
    progress: _Progress


class _RoundDeadline:
    """One deadline for a whole round, which cuts off every connection still open then.

    httpx's timeouts bound every single read, not a whole answer, and a retry would start them
    afresh: a node sending a byte now and then, or never finishing its TLS handshake, would
    hold the round. Each attempt's socket is learnt from httpcore's ``trace`` extension (a
    duplicate of it, so that the TLS layer taking the original over changes nothing) and shut
    down when the time is up, which ends a blocked connect, handshake or read at once.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._ends = time.monotonic() + seconds
        self.expired = False
        self.over = threading.Event()
        """Set when the round ends (its deadline, or :meth:`expire`)."""
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._timer = threading.Timer(seconds, self.expire)
        self._timer.daemon = True

    def __enter__(self) -> _RoundDeadline:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()

    def remaining(self) -> float:
        """Seconds left (0 once over)."""
        return 0.0 if self.expired else max(0.0, self._ends - time.monotonic())

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less when the deadline comes first."""
        self.over.wait(seconds)

    @contextlib.contextmanager
    def attempt(self) -> Iterator[_Attempt]:
        """Watch the sockets of one attempt (see :meth:`_Attempt.watch`) until it ends."""
        attempt = _Attempt(self)
        try:
            yield attempt
        finally:
            attempt.close()

    def watch(self, sock: socket.socket) -> socket.socket | None:
        """Shut ``sock``'s connection down at the deadline; returns the duplicate to release."""
        try:
            watched = sock.dup()
        except OSError:  # out of file descriptors: the socket's own timeouts still apply
            return None
        with self._lock:
            self._sockets.add(watched)
            if self.expired:
                _shut_down(watched)
        return watched

    def release(self, watched: socket.socket) -> None:
        """Stop watching (and close) a duplicate that :meth:`watch` returned."""
        with self._lock:
            self._sockets.discard(watched)
        watched.close()

    def expire(self) -> None:
        """End the round now: every watched connection is shut down."""
        with self._lock:
            self.expired = True
            self.over.set()
            for watched in self._sockets:
                _shut_down(watched)


class _Attempt:
    """The sockets of one request, shut down at the round's deadline."""

    def __init__(self, deadline: _RoundDeadline) -> None:
        self.deadline = deadline
        self.body_sent = False
        """Whether the request's body went out (httpcore said so)."""
        self._watched: list[socket.socket] = []

    def trace(self, event: str, info: Mapping[str, Any]) -> None:
        """httpcore's trace hook: watch the socket as soon as it is connected, and note when
        the request's body is sent."""
        if event.endswith(".connect_tcp.complete"):
            self.watch(info["return_value"].get_extra_info("socket"))
        elif event.endswith(".send_request_body.complete"):
            self.body_sent = True

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock`` down at the deadline, however it is blocked."""
        watched = self.deadline.watch(sock)
        if watched is not None:
            self._watched.append(watched)

    def close(self) -> None:
        for watched in self._watched:
            self.deadline.release(watched)
        self._watched.clear()


def _client(verify: ssl.SSLContext, deadline: _RoundDeadline) -> httpx.Client:
    """A round's client: a connection per request (:data:`_LIMITS`), names (the nodes', and
    the proxies') resolved within the connect timeout and the round (:class:`_BoundedResolution`),
    proxies from the environment as httpx's default client has them."""
    client = httpx.Client(verify=verify, limits=_LIMITS)
    # httpx takes no network backend (and a transport of our own would turn the environment's
    # proxies off); the pools of its transports, httpcore's, do. A test fails if a later httpx
    # moves them (test_a_node_whose_name_does_not_resolve_in_time_is_dropped_at_the_deadline).
    backend = _BoundedResolution(deadline.over)
    mounted = getattr(client, "_mounts", {}).values()
    for transport in [getattr(client, "_transport", None), *mounted]:
        pool = getattr(transport, "_pool", None)
        if isinstance(pool, httpcore.ConnectionPool):  # (proxies' pools too)
            pool._network_backend = backend
    return client


class _BoundedResolution(httpcore.SyncBackend):
    """httpcore's network backend, with the node's name resolved within the connect timeout.

    ``getaddrinfo`` takes no timeout, and no socket exists yet for the round's deadline to shut
    down, so a resolver that hangs would hold the round past its deadline. Here it runs in a
    daemon thread that the connection waits for at most its connect timeout (httpx's timeouts
    are the time the deadline leaves); then the addresses found are tried in their order, as
    ``socket.create_connection`` does, within what is left. A round that ends (``over``) stops
    the wait at once.
    """

    def __init__(self, over: threading.Event) -> None:
        self.over = over

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        ends = None if timeout is None else time.monotonic() + timeout
        error: httpcore.ConnectError | None = None
        for address in _resolve(host, port, timeout, self.over):
            left = None if ends is None else max(0.0, ends - time.monotonic())
            try:
                return super().connect_tcp(address, port, left, local_address, socket_options)
            except httpcore.ConnectError as exc:  # the next address, as create_connection does
                error = exc
        assert error is not None  # (_resolve finds at least one address or raises)
        raise error


def _resolve(host: str, port: int, timeout: float | None, over: threading.Event) -> list[str]:
    """``host``'s addresses in the resolver's order (``host`` itself when it is one):
    :class:`_ResolveTimeout` when the resolver takes longer than ``timeout`` seconds or
    ``over`` is set first, ``httpcore.ConnectError`` when it fails."""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return [host]
    with _LOOKUPS_LOCK:
        lookup = _LOOKUPS.get((host, port))
        if lookup is None:
            lookup = _LOOKUPS[host, port] = _Lookup(host, port)
            threading.Thread(target=lookup.run, name=f"resolve {host}", daemon=True).start()
    if not _first(lookup.done, over, timeout):
        raise _ResolveTimeout(host)
    if isinstance(lookup.answer, OSError):
        raise httpcore.ConnectError(str(lookup.answer)) from lookup.answer
    if isinstance(lookup.answer, Exception):  # e.g. UnicodeError: a label empty or too long
        raise httpcore.ConnectError(f"{host}: {lookup.answer}") from lookup.answer
    if not lookup.answer:
        raise httpcore.ConnectError(f"{host} resolved to no address")
    return lookup.answer


class _ResolveTimeout(httpcore.ConnectTimeout):
    """The resolver did not answer for ``host`` within the connect timeout or the round."""

    def __init__(self, host: str) -> None:
        super().__init__(f"resolving {host} did not end in time")
        self.host = host


class _Lookup:
    """One ``getaddrinfo`` under way, which every connection to its host waits for meanwhile:
    a resolver that hangs holds one thread per host, not one per node, attempt and round."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.done = threading.Event()
        self.answer: list[str] | Exception = []

    def run(self) -> None:
        try:
            found = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            self.answer = list(dict.fromkeys(str(info[4][0]) for info in found))
        except Exception as exc:  # (handed to the connections, never raised in this thread)
            self.answer = exc
        finally:
            with _LOOKUPS_LOCK:  # the next connection looks the name up afresh
                del _LOOKUPS[self.host, self.port]
            self.done.set()


_LOOKUPS: dict[tuple[str, int], _Lookup] = {}
_LOOKUPS_LOCK = threading.Lock()
_POLL_SECONDS = 0.1


def _first(done: threading.Event, over: threading.Event, timeout: float | None) -> bool:
    """Wait until ``done`` is set (True), or ``over`` is or ``timeout`` seconds pass (False)."""
    ends = None if timeout is None else time.monotonic() + timeout
    while not done.is_set():
        left = _POLL_SECONDS if ends is None else min(ends - time.monotonic(), _POLL_SECONDS)
        if over.is_set() or left <= 0:
            return False
        done.wait(left)
    return True


def _shut_down(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed
        sock.shutdown(socket.SHUT_RDWR)


class _MemoryBudget:
    """Bytes shared by the answers of a round that are being read, decoded and checked.

    The updates handed over that the coordinator still holds (:meth:`held`: they wait in its
    reorder buffer for an earlier node) are counted too, but never make an answer wait: they
    wait for an earlier node, which may be slow, and an answer that waited for them would be
    dropped at the deadline for the slowness of another node (one late node would starve the
    round). So the memory of a round is the budget plus the updates waiting to be folded: none
    while the nodes answer in order, at most the round's updates (what the coordinator held
    before the mean was streamed) while an early node is slow.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self._free = total
        self._held: dict[str, int] = {}
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, node_id: str, nbytes: int, deadline: _RoundDeadline) -> Iterator[_Share]:
        """Hold ``nbytes`` of the budget for ``node_id``'s answer, waiting for them until the
        deadline; the bytes that :meth:`_Share.keep` marks stay held after it."""
        if nbytes > self.total:
            raise _Dropped(
                f"decoding this answer could take {nbytes} bytes, more than the memory budget "
                f"of {self.total} bytes"
            )
        with self._changed:
            freed = self._changed.wait_for(
                lambda: self._free + self._holding() >= nbytes, deadline.remaining()
            )
            # (A share freed by the deadline itself, which cut off another answer, is too late.)
            if not freed or deadline.expired:
                raise _Dropped(
                    f"no memory budget free for this answer within the {deadline.seconds:g} s "
                    "deadline"
                )
            self._free -= nbytes
        share = _Share()
        try:
            yield share
        finally:
            kept = min(share.kept, nbytes)
            with self._changed:
                if kept:
                    self._held[node_id] = kept
                self._free += nbytes - kept
                self._changed.notify_all()

    def held(self, node_id: str) -> Callable[[], None]:
        """Gives back the bytes held for ``node_id``'s update (once)."""

        def release() -> None:
            with self._changed:
                self._free += self._held.pop(node_id, 0)
                self._changed.notify_all()

        return release

    def _holding(self) -> int:
        return sum(self._held.values())


class _Share:
    """The bytes of a reservation to keep held once the answer is decoded."""

    kept = 0

    def keep(self, nbytes: int) -> None:
        self.kept = nbytes


@dataclass
class _Health:
    """A node's recent record: failed rounds in a row, and when it is benched, its probes."""

    failures: int = 0
    last_reason: str = ""
    gap: int = 0
    """Rounds sat out before the next probe; 0 while not benched."""
    probe_round: int = 0


class _Bench:
    """Which nodes are benched after ``after`` failed rounds in a row, and when to probe them."""

    def __init__(self, after: int) -> None:
        self.after = after
        self._health: dict[str, _Health] = {}

    def benched(self, node_id: str) -> bool:
        """Whether the node is benched (it is asked only on its probe rounds)."""
        health = self._health.get(node_id)
        return health is not None and health.gap > 0

    def split(
        self, round_id: int, nodes: list[FederatedNode]
    ) -> tuple[list[FederatedNode], dict[str, str]]:
        """The nodes to ask in ``round_id``, and the benched ones that sit it out, with why."""
        asked: list[FederatedNode] = []
        sitting_out: dict[str, str] = {}
        for node in nodes:
            health = self._health.get(node.node_id)
            if health is None or health.gap == 0 or round_id >= health.probe_round:
                asked.append(node)
            else:
                sitting_out[node.node_id] = (
                    f"benched after {health.failures} failed rounds: {health.last_reason}"
                )
        return asked, sitting_out

    def record(self, round_id: int, asked: list[str], failed: Mapping[str, str]) -> None:
        """Note the round's outcome for the asked nodes; log who is benched or back."""
        benched: list[str] = []
        back: list[str] = []
        for node_id in asked:
            health = self._health.setdefault(node_id, _Health())
            if node_id not in failed:
                if health.gap:
                    back.append(node_id)
                self._health[node_id] = _Health()
                continue
            health.failures += 1
            health.last_reason = failed[node_id]
            if health.failures < self.after:
                continue
            if health.gap == 0:
                benched.append(node_id)
            health.gap = min(2 * health.gap, MAX_PROBE_GAP_ROUNDS) if health.gap else 1
            health.probe_round = round_id + health.gap + 1
        if benched:
            logger.warning(
                "round %d: benched after %d failed rounds in a row (asked again after 1, 2, 4, "
                "... rounds): %s",
                round_id,
                self.after,
                ", ".join(benched),
            )
        if back:
            logger.warning("round %d: back from the bench: %s", round_id, ", ".join(back))


def _header_token(token: bytes, what: str) -> str:
    try:
        return check_token(token.decode("utf-8"), what)
    except (UnicodeDecodeError, SecretError) as exc:
        raise ValueError(f"{what} must be printable ASCII (it is sent in an HTTP header)") from exc


def _read_some(response: httpx.Response, limit: int, traffic: _Traffic | None) -> bytes:
    """At most about ``limit`` bytes of the answer's body (an error's detail), counted in
    ``traffic`` when given."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_raw():
        chunks.append(chunk)
        size += len(chunk)
        if traffic is not None:
            traffic.received += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


_REQUEST_SLICE_BYTES = 1 << 20
"""Bytes of the request body handed to the HTTP stack at a time (it copies what it is given:
with the whole body, each of the round's requests in flight would hold a copy of the model)."""


def _body_slices(body: bytes) -> Iterator[bytes]:
    """``body`` in slices of :data:`_REQUEST_SLICE_BYTES` (sent with its ``content-length``,
    so not chunked), each copied only as it is sent."""
    for start in range(0, len(body), _REQUEST_SLICE_BYTES):
        yield body[start : start + _REQUEST_SLICE_BYTES]


def _read_limited(response: httpx.Response, limit: int, traffic: _Traffic | None) -> bytes:
    """The answer's body as sent, refused as soon as it exceeds ``limit`` bytes (counted in
    ``traffic`` when given: the nonce answers are not)."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_raw():
        size += len(chunk)
        if traffic is not None:
            traffic.received += len(chunk)
        if size > limit:
            raise _Dropped(f"answer exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _speaks_tls(address: httpx.URL, deadline: _RoundDeadline) -> bool | None:
    """Whether the server at ``address`` completes a TLS handshake (None: cannot tell)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    port = address.port or (443 if address.scheme == "https" else 80)
    timeout = min(deadline.remaining(), _PROBE_SECONDS)
    if timeout <= 0:
        return None
    ends = time.monotonic() + timeout
    try:
        addresses = _resolve(address.host, port, timeout, deadline.over)
    except (httpcore.ConnectError, httpcore.ConnectTimeout):
        return None
    for host in addresses:  # in order, as create_connection tries them
        left = ends - time.monotonic()
        if left <= 0:
            return None
        with deadline.attempt() as attempt:
            try:
                with socket.create_connection((host, port), timeout=left) as raw:
                    attempt.watch(raw)
                    with context.wrap_socket(raw, server_hostname=address.host):
                        return True
            except ssl.SSLError:
                return False
            except OSError:
                continue
    return None


def _tls_failure(error: BaseException) -> bool:
    """Whether ``error`` was caused by a TLS failure (e.g. an untrusted certificate)."""
    return _cause(error, ssl.SSLError)


def _certificate_failure(error: BaseException) -> bool:
    """Whether ``error`` was caused by a certificate that does not verify."""
    return _cause(error, ssl.SSLCertVerificationError)


def _cause(error: BaseException, kind: type[BaseException]) -> bool:
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, kind):
            return True
        cause = cause.__cause__ or cause.__context__
    return False
