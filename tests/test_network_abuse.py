"""What a reviewer did to the network layer on a fresh clone, each against real processes.

Deeply nested JSON from either side, a holder of the bearer token (but not of the node's key)
trying to make a node train, reset or keep a poisoned state, a replayed request, a flood of
request heads whose bodies never come, a deadline of 1e300 s, lax nodes files, oversized answer
heads and a missing token. Every node is an ``aumai-fedtrain node`` process (or a raw server in
a thread) on 127.0.0.1; every request has a timeout, and everything started is stopped in a
``finally`` (the fixtures' and context managers').
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from aumai_fedtrain import DiLoCoCoordinator, FederatedNode, GlobalState, TrainingConfig
from aumai_fedtrain.models import RoundRecord
from aumai_fedtrain.network import JSON, SAFETENSORS, HttpUpdateProvider, LocalNode, TrainRequest
from aumai_fedtrain.network.provider import MAX_TIMEOUT_SECONDS
from aumai_fedtrain.network.wire import encode_request
from aumai_fedtrain.simulation import initial_model
from tests.helpers import run_cli
from tests.test_network_nodes import (
    LOGGER,
    REQUEST_TIMEOUT,
    Deployment,
    ask_within_bound,
    fixed,
    http_answer,
    raw_node,
    run_main,
    running,
    signed,
    simulate,
    write_secret,
)

MODEL = initial_model(TrainingConfig())
NESTED = b'{"a":' + b"[" * 20000 + b"]" * 20000 + b"}"
NESTED_SAFETENSORS = len(NESTED).to_bytes(8, "little") + NESTED
FLOOD_CONNECTIONS = 200


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return Deployment(tmp_path_factory.mktemp("abuse"), count=1)


@pytest.fixture
def node(deployment: Deployment) -> Iterator[LocalNode]:
    """A fresh node-0 (shard 0) that needs the coordinator's token."""
    with running([deployment.local_node(0)]) as (started,):
        yield started


def auth(deployment: Deployment) -> dict[str, str]:
    return {"authorization": f"Bearer {deployment.token.decode()}"}


def test_deeply_nested_json_is_a_clean_drop_on_the_coordinator_and_a_400_on_the_node(
    deployment: Deployment, node: LocalNode, caplog: pytest.LogCaptureFixture
) -> None:
    nested_update = b'{"node_id": "x", "gradients": {"w": ' + b"[" * 20000 + b"]" * 20000 + b"}}"
    answers = {
        "binary": fixed(http_answer(NESTED_SAFETENSORS)),
        "json": fixed(http_answer(nested_update, JSON)),
    }
    provider = HttpUpdateProvider(
        {name: b"k" * 32 for name in answers}, timeout=REQUEST_TIMEOUT, retries=0
    )
    caplog.set_level(logging.INFO, logger=LOGGER)
    with ExitStack() as stack:
        nodes = []
        for name, answer in answers.items():
            address, _ = stack.enter_context(raw_node(answer))
            nodes.append(FederatedNode(node_id=name, address=address))
        ask_within_bound(provider, nodes)
    key = deployment.keys()["node-0"]
    nested_request = b'{"round_id": 1, "global_weights": {"w": ' + b"[" * 20000 + b"]" * 20000
    bodies = {SAFETENSORS: NESTED_SAFETENSORS, JSON: nested_request + b"}}"}
    answered = {}
    with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
        for content_type, body in bodies.items():
            headers = {"content-type": content_type, **auth(deployment)}
            headers = signed(client, node.url, key, "node-0", 1, body, headers)
            answered[content_type] = client.post(f"{node.url}/train", content=body, headers=headers)
        health = client.get(f"{node.url}/health").json()

    assert provider.failures[1]["binary"].startswith(
        "malformed answer: malformed safetensors body (header: RecursionError: maximum recursion"
    ), provider.failures[1]
    assert provider.failures[1]["json"].startswith(
        "malformed answer: invalid update: Invalid JSON: recursion limit exceeded"
    )
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert answered[SAFETENSORS].status_code == 400
    assert (
        answered[SAFETENSORS]
        .json()["detail"]
        .startswith("malformed safetensors body (header: RecursionError")
    )
    assert answered[JSON].status_code == 400
    assert "recursion limit exceeded" in answered[JSON].json()["detail"]
    assert health["rounds_trained"] == 0
    assert "Traceback" not in node.output(tail=None)


def test_a_token_holder_without_the_key_cannot_make_a_node_train_reset_or_keep_a_poisoned_state(
    deployment: Deployment, node: LocalNode
) -> None:
    """Between the rounds of a real run, the token alone is tried against the node (a round far
    ahead, the last round again with huge weights, a wrong key, a replay), and a key holder
    sends the last round again with huge weights; the run must go on as if nothing happened."""
    key = deployment.keys()["node-0"]
    huge = {name: np.full_like(value, 1e300) for name, value in MODEL.items()}
    url = f"{node.url}/train"
    outcomes: dict[str, httpx.Response] = {}
    trained: list[int] = []

    def attack(record: RoundRecord) -> None:
        if record.round_id != 1:
            return
        json_type = {"content-type": JSON, **auth(deployment)}
        far_ahead = encode_request(TrainRequest(round_id=10**9), JSON)
        poisoned = encode_request(TrainRequest(round_id=1, global_weights=huge), JSON)
        honest = encode_request(TrainRequest(round_id=1, global_weights=MODEL), JSON)
        with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
            health = f"{node.url}/health"
            trained.append(client.get(health).json()["rounds_trained"])
            outcomes["far ahead"] = client.post(url, content=far_ahead, headers=json_type)
            outcomes["poisoned"] = client.post(url, content=poisoned, headers=json_type)
            wrong_key = signed(client, node.url, b"x" * 32, "node-0", 1, poisoned, json_type)
            outcomes["wrong key"] = client.post(url, content=poisoned, headers=wrong_key)
            captured = signed(client, node.url, key, "node-0", 1, honest, json_type)
            outcomes["captured"] = client.post(url, content=honest, headers=captured)
            outcomes["replayed"] = client.post(url, content=honest, headers=captured)
            trained.append(client.get(health).json()["rounds_trained"])
            by_key = signed(client, node.url, key, "node-0", 1, poisoned, json_type)
            outcomes["poisoned by the key"] = client.post(url, content=poisoned, headers=by_key)
            trained.append(client.get(health).json()["rounds_trained"])

    provider = HttpUpdateProvider(
        deployment.keys(), token=deployment.token, model_init=initial_model,
        timeout=REQUEST_TIMEOUT,
    )  # fmt: skip
    nodes = [FederatedNode(node_id="node-0", address=node.address)]
    result = DiLoCoCoordinator().run_training(
        TrainingConfig(num_nodes=1, global_rounds=2), nodes, provider, on_round=attack
    )

    details = {name: answer.json().get("detail", "") for name, answer in outcomes.items()}
    statuses = {name: answer.status_code for name, answer in outcomes.items()}
    assert statuses == {
        "far ahead": 401, "poisoned": 401, "wrong key": 401, "captured": 200, "replayed": 401,
        "poisoned by the key": 500,
    }, details  # fmt: skip
    assert details["far ahead"].startswith("unsigned request: X-Fedtrain-Request-Signature")
    assert details["wrong key"].startswith("bad request signature")
    assert details["replayed"].startswith("unknown, expired or used X-Fedtrain-Node-Nonce")
    assert "non-finite loss nan" in details["poisoned by the key"]
    assert trained == [1, 2, 2]  # the coordinator's round 1, then only the captured request
    assert provider.failures == {1: {}, 2: {}}
    reference = simulate(rounds=2, num_nodes=1).final_state.parameters
    assert reference is not None and result.final_state.parameters is not None
    for name, value in reference.items():  # the node's inner state was never poisoned
        assert result.final_state.parameters[name].tobytes() == value.tobytes()


def test_unsigned_requests_need_the_nodes_option_and_it_warns(tmp_path: Path) -> None:
    key_file = write_secret(tmp_path, "node-0.key")
    strict = LocalNode("node-0", key_file, ["--shard", "0"])
    lax = LocalNode("node-0", key_file, ["--shard", "0", "--allow-unsigned-requests"])
    guide = {"round_id": 1, "global_weights": {}}  # what Pattern 3 of the guide posts
    with running([strict, lax]):
        refused = httpx.post(f"{strict.url}/train", json=guide, timeout=REQUEST_TIMEOUT)
        accepted = httpx.post(f"{lax.url}/train", json=guide, timeout=REQUEST_TIMEOUT)
        strict_output, lax_output = strict.output(tail=None), lax.output(tail=None)

    assert refused.status_code == 401
    assert refused.json()["detail"] == (
        "unsigned request: X-Fedtrain-Request-Signature is missing; this node trains only on "
        "requests signed with its key over a nonce from GET /nonce (or run it with "
        "--allow-unsigned-requests)"
    )
    assert accepted.status_code == 200 and accepted.json()["round_id"] == 1
    warning = "--allow-unsigned-requests: requests need no signature by the key"
    assert warning in lax_output and warning not in strict_output


def test_stalled_request_bodies_are_cut_off_and_health_stays_reachable(
    deployment: Deployment, node: LocalNode
) -> None:
    head = (
        b"POST /train HTTP/1.1\r\nhost: node\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer " + deployment.token + b"\r\ncontent-length: 100000000\r\n\r\n"
    )
    stalled: list[socket.socket] = []
    try:
        for _ in range(FLOOD_CONNECTIONS):
            sock = socket.create_connection((node.host, node.port), timeout=REQUEST_TIMEOUT)
            stalled.append(sock)
            with contextlib.suppress(OSError):  # taken out by a newer connection already
                sock.sendall(head)
        try:
            health = httpx.get(f"{node.url}/health", timeout=REQUEST_TIMEOUT).status_code
        except httpx.TransportError as exc:
            health = repr(exc)
        cut_off = _read_until_closed(stalled[-1])  # the newest: not evicted, it stalls
    finally:
        for sock in stalled:
            sock.close()
    provider = HttpUpdateProvider(
        deployment.keys(), token=deployment.token, timeout=REQUEST_TIMEOUT
    )
    updates, _ = ask_within_bound(
        provider, [FederatedNode(node_id="node-0", address=node.address)], GlobalState()
    )
    output = node.output(tail=None)

    assert health == 200
    assert cut_off  # closed by the node within its body timeout, before our read timed out
    assert isinstance(updates, list) and [update.node_id for update in updates] == ["node-0"]
    for needle in ("Traceback", "AttributeError", "ClientDisconnect"):
        assert needle not in output, output[-3000:]


def _read_until_closed(sock: socket.socket) -> bool:
    """Whether the peer closes ``sock`` before its timeout (whatever it sends first)."""
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:  # reset: closed too
        pass
    return True


def nodes_file(folder: Path, **entry: Any) -> Path:
    key = write_secret(folder, "node-0.key")
    path = folder / "nodes.json"
    fields = {"node_id": "node-0", "address": "127.0.0.1:9", "key_file": key.name, **entry}
    path.write_text(json.dumps([fields]))
    return path


def test_a_deadline_beyond_a_day_is_a_one_line_error(tmp_path: Path) -> None:
    completed = run_cli(
        "run", "--nodes-file", str(nodes_file(tmp_path)), "--timeout", "1e300", cwd=tmp_path
    )
    keys = {"a": b"k" * 32}

    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        "Error: need a finite timeout > 0 of at most 86400 s (one day), got 1e+300"
    ]
    assert HttpUpdateProvider(keys, timeout=MAX_TIMEOUT_SECONDS).timeout == 86_400
    with pytest.raises(ValueError, match="at most 86400 s"):
        HttpUpdateProvider(keys, timeout=MAX_TIMEOUT_SECONDS * 1.01)
    with pytest.raises(ValueError, match="backoff >= 0 of at most 30 s, got 1e\\+300"):
        HttpUpdateProvider(keys, backoff=1e300)


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ({"max_samples": "320"}, "entry 0: max_samples: Input should be a valid integer"),
        ({"bogus": 1}, "entry 0: unknown key 'bogus'"),
        (
            {"address": "ftp://127.0.0.1:9"},
            "entry 0: address: 'ftp://127.0.0.1:9' has the scheme 'ftp'; use http://, https:// "
            "or host:port",
        ),
        (
            {"address": "127.0.0.1:70000"},
            "entry 0: address: '127.0.0.1:70000' has no valid port (1 to 65535)",
        ),
        (
            {"address": "https://h:0/x"},
            "entry 0: address: 'https://h:0/x' has no valid port (1 to 65535)",
        ),
    ],
)
def test_nodes_files_are_strict_and_refused_when_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], entry: dict[str, Any], error: str
) -> None:
    path = nodes_file(tmp_path, **entry)

    code, err = run_main(capsys, "run", "--nodes-file", str(path), "--timeout", "5")

    assert code == 2
    assert err.strip().splitlines() == [f"Error: invalid nodes file {str(path)!r}: {error}"]


def test_a_bad_address_given_in_python_is_refused_before_the_round() -> None:
    provider = HttpUpdateProvider({"a": b"k" * 32}, timeout=REQUEST_TIMEOUT)

    with pytest.raises(ValueError, match="node 'a' has an invalid address: 'a:99999' has no"):
        provider.get_updates(1, GlobalState(), [FederatedNode(node_id="a", address="a:99999")])


def test_oversized_answer_heads_are_named_and_not_retried() -> None:
    answer = b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 200_000 + b"\r\ncontent-length: 0\r\n\r\n"
    provider = HttpUpdateProvider({"big": b"k" * 32}, timeout=REQUEST_TIMEOUT, backoff=0.01)
    with raw_node(fixed(answer)) as (address, heads):
        ask_within_bound(provider, [FederatedNode(node_id="big", address=address)])

    assert provider.failures[1] == {
        "big": f"answer headers too large (from http://{address}/train)"
    }
    assert len(heads) == 1


def test_a_node_that_needs_a_token_the_coordinator_lacks_is_named(
    deployment: Deployment, node: LocalNode, tmp_path: Path
) -> None:
    path = tmp_path / "nodes.json"
    key_file = str(deployment.key_files["node-0"])
    path.write_text(
        json.dumps([{"node_id": "node-0", "address": node.address, "key_file": key_file}])
    )

    completed = run_cli("run", "--nodes-file", str(path), "--rounds", "1", cwd=tmp_path)

    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines()[-1] == (
        "Error: QuorumError: round 1: 0 of 1 nodes sent a valid update, the quorum is 1 (node-0: "
        "node node-0 requires a token: give it a token_file in the nodes file or --token-file)"
    )
