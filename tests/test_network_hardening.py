"""Hardening of the network layer against slow, dead, hostile and misconfigured nodes.

One deadline per round, bounded decoding within a memory budget, benching of failing nodes,
idle connections on the node, TLS on one side only, per-node tokens and secret hygiene. Every
node is a real process on 127.0.0.1 or a small server in a thread; every request has a timeout
and every process, socket and server is stopped in a ``finally``.
"""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aumai_fedtrain import DiLoCoCoordinator, FederatedNode, GlobalState, LocalUpdate
from aumai_fedtrain.models import RoundRecord, TrainingConfig
from aumai_fedtrain.network import SAFETENSORS, HttpUpdateProvider, LocalNode, QuorumError
from aumai_fedtrain.network.auth import sign_update
from aumai_fedtrain.network.provider import MIN_MEMORY_BUDGET
from aumai_fedtrain.network.wire import encode_update, max_update_bytes
from aumai_fedtrain.simulation import initial_model
from tests.helpers import run_cli
from tests.hostile_nodes import flood
from tests.test_network_nodes import (
    COMMAND_TIMEOUT,
    LOGGER,
    REQUEST_TIMEOUT,
    SAMPLES_PER_ROUND,
    Answer,
    Deployment,
    ask_within_bound,
    fixed,
    http_answer,
    make_certificates,
    raw_node,
    run_main,
    running,
    write_secret,
)

MODEL = initial_model(TrainingConfig())
STATE = GlobalState(parameters=MODEL)
KEY = secrets.token_hex(32).encode()
Honest = tuple[Deployment, list[LocalNode]]


@pytest.fixture(scope="module")
def honest_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Honest]:
    """Two honest nodes (shards 0 and 1) that need the coordinator's token, and their secrets."""
    deployment = Deployment(tmp_path_factory.mktemp("deployment"), count=2)
    with running([deployment.local_node(i) for i in range(2)]) as nodes:
        yield deployment, nodes


def zero_update(node_id: str, round_id: int) -> LocalUpdate:
    gradients = {name: np.zeros_like(value) for name, value in MODEL.items()}
    return LocalUpdate(
        node_id=node_id, round_id=round_id, gradients=gradients, loss=1.0, samples_used=1
    )


def signed_answer(head: bytes, node_id: str, round_id: int) -> bytes:
    """A valid answer of ``node_id`` (zero pseudo-gradient) to the request with ``head``."""
    found = re.search(rb"(?im)^x-fedtrain-nonce:\s*([0-9a-f]*)", head)
    nonce = found.group(1).decode() if found else ""
    update = zero_update(node_id, round_id)
    return http_answer(
        encode_update(update, SAFETENSORS), x_fedtrain_signature=sign_update(KEY, update, nonce)
    )


def honest(node_id: str, round_id: int = 1, pause: float = 0.0, split: float = 0.0) -> Answer:
    """A raw node that waits ``pause`` s, sends its head, waits ``split`` s, then its body."""

    def answer(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
        stop.wait(pause)
        data = signed_answer(head, node_id, round_id)
        cut = data.index(b"\r\n\r\n") + 4
        conn.sendall(data[:cut])
        stop.wait(split)
        conn.sendall(data[cut:])

    return answer


def late(status: bytes, after: float) -> Answer:
    """A raw node that answers ``status`` (e.g. 503) ``after`` seconds."""

    def answer(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
        stop.wait(after)
        conn.sendall(b"HTTP/1.1 " + status + b"\r\ncontent-length: 4\r\n\r\nbusy")

    return answer


def silent(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    """A raw node that never answers."""
    stop.wait(COMMAND_TIMEOUT)


def test_a_503_just_before_the_deadline_does_not_stretch_the_round(
    honest_nodes: Honest,
) -> None:
    deployment, cluster = honest_nodes
    provider = HttpUpdateProvider(
        {**deployment.keys(), "busy": KEY}, token=deployment.token, timeout=3, backoff=0.5
    )
    with raw_node(late(b"503 Service Unavailable", after=2.7)) as (address, heads):
        nodes = [
            FederatedNode(node_id="node-0", address=cluster[0].address),
            FederatedNode(node_id="busy", address=address),
        ]
        updates, seconds = ask_within_bound(provider, nodes, STATE)

    assert isinstance(updates, list) and [update.node_id for update in updates] == ["node-0"]
    assert seconds < 3 + 1.5  # the deadline, not 3 attempts of 3 s and their back-off
    assert len(heads) <= 2
    reason = provider.failures[1]["busy"]
    assert reason.startswith(("HTTP 503: busy", "no answer within 3 s")), reason


def test_a_tls_handshake_that_never_completes_ends_with_the_round(tmp_path: Path) -> None:
    ca, _, _ = make_certificates(tmp_path)
    provider = HttpUpdateProvider({"mute": KEY}, ca_file=ca, timeout=2, retries=2, backoff=0.1)
    with raw_node(silent) as (address, _):  # it reads the ClientHello as a request head
        error, seconds = ask_within_bound(
            provider, [FederatedNode(node_id="mute", address=address)]
        )

    assert isinstance(error, QuorumError)
    assert seconds < 2 + 1.5
    assert provider.failures[1] == {"mute": "no answer within 2 s"}


class Resolver:
    """``socket.getaddrinfo`` with some names of the test's own: one that hangs until the test
    ends, one that fails at once, one that is the first honest node's loopback address."""

    HANGS, FAILS, ALIAS, ODD = "hangs.example", "fails.example", "alias.example", "odd.example"

    def __init__(self, alias_of: str) -> None:
        self.released = threading.Event()
        self.hanging_lookups = 0
        self.alias_of = alias_of
        self._real = socket.getaddrinfo

    def __call__(self, host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == self.HANGS:
            self.hanging_lookups += 1
            self.released.wait(COMMAND_TIMEOUT)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if host == self.FAILS:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if host == self.ODD:  # what the idna codec raises for a label empty or too long
            raise UnicodeError("encoding with 'idna' codec failed (UnicodeError: label too long)")
        if host == self.ALIAS:
            loopback_v6 = self._real("::1", *args, **kwargs)
            return [*loopback_v6, *self._real(self.alias_of, *args, **kwargs)]
        return self._real(host, *args, **kwargs)


def test_a_node_whose_name_does_not_resolve_in_time_is_dropped_at_the_deadline(
    honest_nodes: Honest, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment, cluster = honest_nodes
    host, port = cluster[0].address.rsplit(":", 1)
    resolver = Resolver(alias_of=host)
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    keys = {**deployment.keys(), "far": KEY, "farther": KEY, "gone": KEY, "odd": KEY}
    provider = HttpUpdateProvider(keys, token=deployment.token, timeout=2)
    nodes = [
        # No node listens on ::1: the alias's second address (loopback IPv4) is tried next.
        FederatedNode(node_id="node-0", address=f"{Resolver.ALIAS}:{port}"),
        FederatedNode(node_id="far", address=f"{Resolver.HANGS}:{port}"),
        FederatedNode(node_id="farther", address=f"{Resolver.HANGS}:{port}"),
        FederatedNode(node_id="gone", address=f"{Resolver.FAILS}:{port}"),
        FederatedNode(node_id="odd", address=f"{Resolver.ODD}:{port}"),
    ]
    thread_errors: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)

    try:
        rounds = [ask_within_bound(provider, nodes, STATE) for _ in range(2)]
    finally:
        resolver.released.set()

    for updates, seconds in rounds:
        assert isinstance(updates, list) and [update.node_id for update in updates] == ["node-0"]
        assert seconds < 2 + 1.5  # the deadline, not the resolver's own (here: the test's)
    # Both nodes of the hanging name, in both rounds, waited for one lookup.
    assert resolver.hanging_lookups == 1
    assert provider.failures[1]["far"] == provider.failures[1]["farther"]
    assert provider.failures[1]["far"] == (
        f"no answer within 2 s (resolving {Resolver.HANGS} did not end in time)"
    )
    assert provider.failures[1]["gone"].startswith(
        f"cannot reach http://{Resolver.FAILS}:{port}/train"
    )
    assert "Name or service not known" in provider.failures[1]["gone"]
    assert provider.failures[1]["odd"].startswith(
        f"cannot reach http://{Resolver.ODD}:{port}/train: {Resolver.ODD}: encoding with 'idna'"
    )
    assert thread_errors == []  # (no lookup thread died with a traceback)


def test_a_round_given_up_does_not_wait_for_a_hanging_resolver(
    honest_nodes: Honest, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment, cluster = honest_nodes
    resolver = Resolver(alias_of="127.0.0.1")
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    keys = {**deployment.keys(), "far": KEY}
    provider = HttpUpdateProvider(keys, token=deployment.token, timeout=60)
    nodes = [
        FederatedNode(node_id="node-0", address=cluster[0].address),
        FederatedNode(node_id="far", address=f"{Resolver.HANGS}:9"),
    ]

    arrivals = provider.iter_updates(1, STATE, nodes)
    try:
        first = next(arrivals)
        started = time.monotonic()
        arrivals.close()  # as the coordinator does when the round is given up (Ctrl-C, errors)
        seconds = time.monotonic() - started
    finally:
        resolver.released.set()

    assert [update.node_id for update in first.updates] == ["node-0"]
    assert seconds < 5  # not the 60 s deadline the lookup would otherwise be waited for


def test_a_proxy_whose_name_hangs_holds_the_round_no_longer_than_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    resolver = Resolver(alias_of="127.0.0.1")
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, f"http://{Resolver.HANGS}:3128")
    provider = HttpUpdateProvider({"node-0": KEY}, timeout=2, retries=0)

    try:
        error, seconds = ask_within_bound(
            provider, [FederatedNode(node_id="node-0", address="127.0.0.1:9")], STATE
        )
    finally:
        resolver.released.set()

    assert isinstance(error, QuorumError)
    assert seconds < 2 + 1.5
    assert resolver.hanging_lookups == 1  # the proxy's name was looked up
    assert provider.failures[1]["node-0"] == (
        f"no answer within 2 s (resolving {Resolver.HANGS} did not end in time)"
    )


def empty_tensors_answer(count: int, chunked: bool = False) -> bytes:
    """A safetensors answer of ``count`` empty tensors (today's 1.6M-tensor attack, smaller)."""
    metadata = {"aumai-fedtrain": "local-update/1", "node_id": "flood", "round_id": "1",
                "loss": "1.0", "samples_used": "1"}  # fmt: skip
    header: dict[str, Any] = {"__metadata__": metadata}
    header.update(
        {f"t{i}": {"dtype": "F64", "shape": [0], "data_offsets": [0, 0]} for i in range(count)}
    )
    text = json.dumps(header).encode()
    body = len(text).to_bytes(8, "little") + text
    if not chunked:
        return http_answer(body)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-safetensors\r\n"
    return (
        head
        + b"transfer-encoding: chunked\r\n\r\n"
        + b"%x\r\n" % len(body)
        + body
        + b"\r\n0\r\n\r\n"
    )


def test_answers_larger_than_an_update_of_the_model_are_refused_unread() -> None:
    limit = max_update_bytes({name: value.shape for name, value in MODEL.items()}, SAFETENSORS)
    answers = {
        "declared": fixed(empty_tensors_answer(100_000)),
        "chunked": fixed(empty_tensors_answer(100_000, chunked=True)),
    }
    provider = HttpUpdateProvider(
        {name: KEY for name in answers}, timeout=REQUEST_TIMEOUT, retries=0
    )
    with ExitStack() as stack:
        nodes = []
        for name, answer in answers.items():
            address, _ = stack.enter_context(raw_node(answer))
            nodes.append(FederatedNode(node_id=name, address=address))
        error, _ = ask_within_bound(provider, nodes, STATE)

    assert isinstance(error, QuorumError)
    assert provider.failures[1]["declared"].startswith("answer of ")
    assert provider.failures[1]["declared"].endswith(f"bytes exceeds the limit of {limit} bytes")
    assert provider.failures[1]["chunked"] == f"answer exceeds the limit of {limit} bytes"


def test_answers_share_a_memory_budget_and_wait_for_it_within_the_deadline() -> None:
    provider = HttpUpdateProvider({"a": KEY, "b": KEY}, timeout=REQUEST_TIMEOUT)
    body = encode_update(zero_update("a", 1), SAFETENSORS)
    one_answer = provider.answer_memory(SAFETENSORS, len(body), MODEL)
    # Room for one answer at a time: b's (at 0.3 s) waits until a's (body after 1 s) is done.
    provider.memory_budget = one_answer + one_answer // 2
    with ExitStack() as stack:
        nodes = []
        for name, answer in {"a": honest("a", split=1.0), "b": honest("b", pause=0.3)}.items():
            address, _ = stack.enter_context(raw_node(answer))
            nodes.append(FederatedNode(node_id=name, address=address))
        both, _ = ask_within_bound(provider, nodes, STATE)
        provider.timeout = 2  # now a's body comes after the deadline: b cannot get its share
        nodes[0] = FederatedNode(
            node_id="a", address=stack.enter_context(raw_node(honest("a", split=3.0)))[0]
        )
        neither, _ = ask_within_bound(provider, nodes, STATE)
        waited = provider.round_failures(1)
        provider.memory_budget = one_answer - 1
        too_large, _ = ask_within_bound(provider, nodes[1:], STATE)

    assert isinstance(both, list) and sorted(update.node_id for update in both) == ["a", "b"]
    assert isinstance(neither, QuorumError)
    assert waited == {
        "a": "no answer within 2 s",
        "b": "no memory budget free for this answer within the 2 s deadline",
    }
    assert isinstance(too_large, QuorumError)
    assert provider.failures[1]["b"] == (
        f"decoding this answer could take {one_answer} bytes, more than the memory budget of "
        f"{one_answer - 1} bytes"
    )
    assert provider.default_budget(MODEL) == MIN_MEMORY_BUDGET


def test_a_failing_node_is_benched_probed_after_growing_gaps_and_comes_back(
    honest_nodes: Honest, caplog: pytest.LogCaptureFixture
) -> None:
    deployment, cluster = honest_nodes
    healthy = threading.Event()
    current = {"round": 1}

    def flaky(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
        if healthy.is_set():
            conn.sendall(signed_answer(head, "flaky", current["round"]))
        else:
            conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy")

    def next_round(record: RoundRecord) -> None:
        current["round"] = record.round_id + 1
        if record.round_id == 6:
            healthy.set()

    caplog.set_level(logging.INFO, logger=LOGGER)
    with raw_node(flaky) as (address, heads):
        nodes = [
            FederatedNode(node_id="node-0", address=cluster[0].address),
            FederatedNode(node_id="flaky", address=address),
        ]
        provider = HttpUpdateProvider(
            {**deployment.keys(), "flaky": KEY}, token=deployment.token, backoff=0.01,
            timeout=REQUEST_TIMEOUT,
        )  # fmt: skip
        result = DiLoCoCoordinator().run_training(
            TrainingConfig(num_nodes=2, global_rounds=9), nodes, provider, on_round=next_round
        )

    assert [record.num_participants for record in result.history] == [1] * 7 + [2, 2]
    busy = "HTTP 503: busy"
    benched = "benched after {} failed rounds: HTTP 503: busy"
    reasons = {
        round_id: provider.round_failures(round_id).get("flaky") for round_id in range(1, 10)
    }
    assert reasons == {
        1: busy, 2: busy, 3: busy,  # asked with 2 retries each
        4: benched.format(3),  # sits out 1 round
        5: busy,  # probed once, fails
        6: benched.format(4), 7: benched.format(4),  # sits out 2 rounds
        8: None, 9: None,  # probed, answers: back
    }  # fmt: skip
    assert len(heads) == 3 * 3 + 1 + 1 + 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    dropped = "round {}: 1 of 2 nodes dropped (flaky: {})"
    assert warnings == [  # one line per round, and one when the bench changes
        dropped.format(1, busy),
        dropped.format(2, busy),
        "round 3: benched after 3 failed rounds in a row (asked again after 1, 2, 4, ... "
        "rounds): flaky",
        dropped.format(3, busy),
        *(dropped.format(i, reasons[i]) for i in (4, 5, 6, 7)),
        "round 8: back from the bench: flaky",
    ]


def test_benched_nodes_are_asked_when_the_quorum_needs_them(honest_nodes: Honest) -> None:
    deployment, cluster = honest_nodes
    healthy = threading.Event()

    def flaky(conn: socket.socket, request: bytes, stop: threading.Event) -> None:
        if healthy.is_set():
            conn.sendall(signed_answer(request, "flaky", 4))
        else:
            conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy")

    provider = HttpUpdateProvider(
        {**deployment.keys(), "flaky": KEY}, token=deployment.token, min_nodes=2, retries=0,
        timeout=REQUEST_TIMEOUT,
    )  # fmt: skip
    with raw_node(flaky) as (address, requests):
        nodes = [
            FederatedNode(node_id="node-0", address=cluster[0].address),
            FederatedNode(node_id="flaky", address=address),
        ]
        for round_id in (1, 2, 3):
            with pytest.raises(QuorumError):
                provider.get_updates(round_id, STATE, nodes)
        healthy.set()
        updates = provider.get_updates(4, STATE, nodes)  # flaky is benched, but needed

    assert sorted(update.node_id for update in updates) == ["flaky", "node-0"]
    assert len(requests) == 4


def test_a_node_survives_a_thousand_idle_connections(
    honest_nodes: Honest,
) -> None:
    """The node closes connections that send no request head, so the coordinator gets in."""
    deployment = honest_nodes[0]
    with running([deployment.local_node(0)]) as (node,), flood(node, REQUEST_TIMEOUT) as idle:
        provider = HttpUpdateProvider(
            deployment.keys(), token=deployment.token, timeout=REQUEST_TIMEOUT
        )
        updates, _ = ask_within_bound(
            provider, [FederatedNode(node_id="node-0", address=node.address)], STATE
        )
        closed_by_node = idle[-1].recv(1)  # within its header timeout (no request head)
        output = node.output(tail=None)

    assert isinstance(updates, list) and [update.node_id for update in updates] == ["node-0"]
    assert closed_by_node == b""
    assert len(output) < 20_000, output[-3000:]


def test_tls_on_one_side_only_is_named(
    honest_nodes: Honest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment, cluster = honest_nodes
    monkeypatch.setattr(socket, "getaddrinfo", Resolver(alias_of="127.0.0.1"))
    ca, cert, key = make_certificates(tmp_path)
    tls_node = deployment.local_node(
        1, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), ca_file=ca
    )
    keys = deployment.keys()
    plain_provider = HttpUpdateProvider(keys, token=deployment.token, timeout=REQUEST_TIMEOUT)
    tls_provider = HttpUpdateProvider(
        keys, token=deployment.token, ca_file=ca, timeout=REQUEST_TIMEOUT
    )
    with running([tls_node]):
        bare = [FederatedNode(node_id="node-1", address=tls_node.address)]
        explicit_http = [FederatedNode(node_id="node-1", address=f"http://{tls_node.address}")]
        plain_node = [FederatedNode(node_id="node-0", address=cluster[0].address)]
        # The probe tries the name's addresses in order, as the connection did (::1 refuses).
        alias = f"{Resolver.ALIAS}:{tls_node.port}"
        named = [FederatedNode(node_id="node-1", address=alias)]
        outcomes = [
            ask_within_bound(plain_provider, bare, STATE)[0],
            ask_within_bound(tls_provider, explicit_http, STATE)[0],
            ask_within_bound(tls_provider, plain_node, STATE)[0],
            ask_within_bound(plain_provider, named, STATE)[0],
        ]
        handshake = socket.create_connection(("127.0.0.1", tls_node.port), REQUEST_TIMEOUT)
        with handshake:
            silent_handshake_closed = handshake.recv(1)  # no ClientHello: closed in time

    assert all(isinstance(outcome, QuorumError) for outcome in outcomes)
    assert str(outcomes[0]).endswith(
        "(node-1: node speaks TLS: pass --ca-file (ca_file=), or write https:// in its address "
        f"(asked over plain HTTP: http://{tls_node.address}/train))"
    )
    assert "node-1: node speaks TLS: pass --ca-file" in str(outcomes[1])
    assert "node-0: node speaks plain HTTP, not TLS: write http:// in its address" in str(
        outcomes[2]
    )
    assert str(outcomes[3]).endswith(
        "(node-1: node speaks TLS: pass --ca-file (ca_file=), or write https:// in its address "
        f"(asked over plain HTTP: http://{alias}/train))"
    )
    assert silent_handshake_closed == b""


def test_each_node_gets_its_own_token(tmp_path: Path) -> None:
    deployment = Deployment(tmp_path, count=2)
    own_token = write_secret(tmp_path, "node-0.token")
    node_0 = LocalNode(
        "node-0", deployment.key_files["node-0"], ["--shard", "0", "--token-file", str(own_token)]
    )
    with running([node_0, deployment.local_node(1)]) as nodes:
        entries = [
            {"node_id": "node-0", "address": nodes[0].address, "key_file": "node-0.key",
             "token_file": "node-0.token", "max_samples": 320},
            {"node_id": "node-1", "address": nodes[1].address, "key_file": "node-1.key"},
        ]  # fmt: skip
        nodes_file = tmp_path / "nodes.json"
        nodes_file.write_text(json.dumps(entries))
        common = ["run", "--nodes-file", str(nodes_file), "--rounds", "1", "--json"]
        completed = run_cli(*common, "--token-file", str(deployment.token_file), cwd=tmp_path)
        shared_only = HttpUpdateProvider(deployment.keys(), token=deployment.token, timeout=10)
        refused = ask_within_bound(
            shared_only, [FederatedNode(node_id="node-0", address=nodes[0].address)], STATE
        )[0]

    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["credits"] == {
        "node-0": SAMPLES_PER_ROUND,
        "node-1": SAMPLES_PER_ROUND,
    }
    assert isinstance(refused, QuorumError) and "node-0: HTTP 403" in str(refused)


def test_a_non_ascii_token_is_the_coordinators_input_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "token"
    token.write_text("é" * 40)
    token.chmod(0o600)
    key = write_secret(tmp_path, "a.key")
    nodes_file = tmp_path / "nodes.json"
    nodes_file.write_text(
        json.dumps([{"node_id": "a", "address": "127.0.0.1:9", "key_file": key.name}])
    )
    inline = tmp_path / "inline.json"
    inline.write_text(
        json.dumps(
            [{"node_id": "a", "address": "127.0.0.1:9", "key_file": key.name, "token": "ü" * 40}]
        )
    )
    inline.chmod(0o600)

    code, err = run_main(capsys, "run", "--nodes-file", str(nodes_file), "--token-file", str(token))
    inline_code, inline_err = run_main(capsys, "run", "--nodes-file", str(inline))

    assert (code, inline_code) == (2, 2)
    assert err.strip().splitlines() == [
        f"Error: token file {str(token)!r} must be printable ASCII (it is sent in an HTTP "
        "header); use e.g. the output of: openssl rand -hex 32"
    ]
    assert len(inline_err.strip().splitlines()) == 1
    assert "entry 0 ('a'): token must be printable ASCII" in inline_err
    with pytest.raises(ValueError, match="token of node 'a' must be printable ASCII"):
        HttpUpdateProvider({"a": KEY}, tokens={"a": "ü".encode() * 40})


def test_repeated_node_log_lines_are_shown_once_per_window_with_a_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aumai_fedtrain.network import server

    now = [1000.0]
    monkeypatch.setattr(server.time, "monotonic", lambda: now[0])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(server._RepeatFilter())
    log = logging.getLogger("test.repeats")
    log.addHandler(handler)
    log.propagate = False
    try:
        for second in range(25):  # the same failure every 0.5 s, and one other line
            now[0] = 1000.0 + second / 2
            log.error("socket.accept() out of system resource")
        log.error("another line")
        now[0] = 1010.0 + server.REPEAT_WINDOW_SECONDS + 15
        log.error("socket.accept() out of system resource")
    finally:
        log.removeHandler(handler)

    assert stream.getvalue().splitlines() == [
        "socket.accept() out of system resource",  # at 0 s; 0.5 s ... 9.5 s held back
        "socket.accept() out of system resource (and 19 more times in 10 s)",  # at 10 s
        "another line",
        "socket.accept() out of system resource (and 4 more times in 10 s)",
    ]


def test_a_request_body_cut_off_by_the_node_is_not_counted_as_sent() -> None:
    # Prepare: a node that hands out a nonce, then resets every POST after 64 KiB of a 40 MB
    # body (more than the loopback socket buffers take, so the upload fails midway).
    big = GlobalState(parameters={"w": np.zeros(5_000_000)})
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.05)
    stop = threading.Event()
    posts: list[int] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(REQUEST_TIMEOUT)
                head = conn.recv(65536)
                if head.startswith(b"GET /nonce "):
                    nonce = json.dumps({"nonce": secrets.token_hex(16)}).encode()
                    conn.sendall(http_answer(nonce, "application/json"))
                    continue
                posts.append(len(head))
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    provider = HttpUpdateProvider({"cut": KEY}, timeout=20, retries=1, backoff=0.1)
    try:
        # Execute
        with pytest.raises(QuorumError, match="cut"):
            provider.get_updates(1, big, [FederatedNode(node_id="cut", address=address)])
    finally:
        stop.set()
        thread.join(timeout=COMMAND_TIMEOUT)
        server.close()

    # Assert: every attempt was cut off, and no body counts as sent.
    assert len(posts) >= 2
    stats = provider.round_stats(1)
    assert stats is not None and stats.bytes_to_nodes == 0
