"""A 3-node loopback run with a failing node, seen through metrics.jsonl, the report and the
nodes' ``/metrics`` (parsed with prometheus-client's parser).

node-0 and node-1 are honest ``aumai-fedtrain node`` processes; node-2 signs with a key the
coordinator does not know, so every answer of it is dropped (bad signature) and it is benched
after 3 rounds. The byte counts of the coordinator and of the nodes must agree exactly.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import matplotlib.image
import pytest

from aumai_fedtrain import TrainingConfig
from aumai_fedtrain.network import LocalNode
from aumai_fedtrain.network.wire import expected_tensors, request_body_bytes
from aumai_fedtrain.observability.report import PLOTS
from aumai_fedtrain.simulation import initial_model
from tests.helpers import run_cli
from tests.test_network_nodes import REQUEST_TIMEOUT, Deployment, running, write_secret
from tests.test_observability import embedded_images, metric_values

ROUNDS = 5
BENCHED_ROUND = 4  # failed rounds 1-3: benched, sits round 4 out, probed in round 5


@dataclass
class NetworkRun:
    folder: Path
    deployment: Deployment
    nodes: list[LocalNode]
    metrics_token: bytes
    lines: list[dict[str, Any]]
    summary: dict[str, Any]


@pytest.fixture(scope="module")
def network_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkRun]:
    folder = tmp_path_factory.mktemp("network")
    deployment = Deployment(folder, count=3)
    metrics_token_file = write_secret(folder, "metrics.token")
    wrong_key = write_secret(folder, "wrong.key")
    args = ["--token-file", str(deployment.token_file), "--max-body-mb", "1"]
    nodes = [
        deployment.local_node(0, "--metrics-token-file", str(metrics_token_file)),
        deployment.local_node(1, "--log-format", "json"),
        LocalNode("node-2", wrong_key, ["--shard", "2", *args]),
    ]
    with running(nodes):
        done = run_cli(
            "run",
            "--nodes-file", str(deployment.nodes_file(nodes)),
            "--token-file", str(deployment.token_file),
            "--rounds", str(ROUNDS),
            "--checkpoint-dir", str(folder / "run"),
            "--timeout", "60",
            "--json",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").open()]
        yield NetworkRun(
            folder,
            deployment,
            nodes,
            metrics_token_file.read_text().strip().encode(),
            lines,
            json.loads(done.stdout),
        )


def scrape(node: LocalNode, token: bytes | None) -> httpx.Response:
    headers = {"authorization": f"Bearer {token.decode()}"} if token else {}
    return httpx.get(f"{node.url}/metrics", headers=headers, timeout=REQUEST_TIMEOUT)


def test_metrics_file_names_the_failing_node_and_measures_the_wire(network_run: NetworkRun) -> None:
    shapes = expected_tensors(initial_model(TrainingConfig()))
    lines = network_run.lines

    assert [line["round_id"] for line in lines] == list(range(1, ROUNDS + 1))
    for line in lines:
        round_id = line["round_id"]
        assert line["participants"] == ["node-0", "node-1"]
        reason = line["dropped"]["node-2"]
        asked = ["node-0", "node-1"] + ([] if round_id == BENCHED_ROUND else ["node-2"])
        if round_id == BENCHED_ROUND:
            assert line["benched"] == ["node-2"]
            assert reason.startswith("benched after 3 failed rounds: bad request signature")
        else:
            assert line["benched"] == []
            # A node with another key refuses the coordinator's signed request.
            assert reason.startswith("bad request signature: node-2 does not hold the key")
        assert line["node_times"]["kind"] == "answer"
        assert sorted(line["node_times"]["per_node"]) == asked
        assert line["bytes_to_nodes"] == len(asked) * request_body_bytes(round_id, shapes)
        assert set(line["phase_seconds"]) == {
            "collect", "verify", "aggregate", "outer_step", "evaluate", "checkpoint"
        }  # fmt: skip
    assert network_run.summary["bytes_to_nodes"] == sum(line["bytes_to_nodes"] for line in lines)


def test_node_metrics_agree_with_the_coordinators_bytes_and_count_requests(
    network_run: NetworkRun,
) -> None:
    deployment, nodes = network_run.deployment, network_run.nodes
    tokens = [network_run.metrics_token, deployment.token, deployment.token]
    counts = [
        metric_values(scrape(node, token).text) for node, token in zip(nodes, tokens, strict=True)
    ]

    received = sum(c[("fedtrain_node_received_bytes_total", ())] for c in counts)
    sent = sum(c[("fedtrain_node_sent_bytes_total", ())] for c in counts)
    assert received == sum(line["bytes_to_nodes"] for line in network_run.lines)
    assert sent == sum(line["bytes_from_nodes"] for line in network_run.lines)
    trained = [c[("fedtrain_node_requests_total", (("outcome", "trained"),))] for c in counts]
    assert trained == [ROUNDS, ROUNDS, 0]  # node-2 refuses the requests signed with our key
    refused = counts[2][("fedtrain_node_requests_total", (("outcome", "unauthorized"),))]
    assert refused == ROUNDS - 1  # and sat one round out, benched
    assert counts[0][("fedtrain_node_training_seconds_count", ())] == ROUNDS

    # what this test does: one request with a wrong token, one with a bad body
    node = nodes[0]
    wrong = httpx.post(
        f"{node.url}/train", headers={"authorization": "Bearer nope"}, timeout=REQUEST_TIMEOUT
    )
    bad = httpx.post(
        f"{node.url}/train",
        headers={"authorization": f"Bearer {deployment.token.decode()}"},
        content=b"{}",
        timeout=REQUEST_TIMEOUT,
    )
    after = metric_values(scrape(node, network_run.metrics_token).text)

    assert (wrong.status_code, bad.status_code) == (403, 415)
    assert after[("fedtrain_node_requests_total", (("outcome", "unauthorized"),))] == 1
    assert after[("fedtrain_node_requests_total", (("outcome", "bad_request"),))] == 1
    assert after[("fedtrain_node_requests_total", (("outcome", "trained"),))] == ROUNDS
    assert scrape(node, None).status_code == 401
    assert scrape(node, deployment.token).status_code == 403  # node-0 has a metrics token


def test_a_node_logs_json_lines(network_run: NetworkRun) -> None:
    output = network_run.nodes[1].output(tail=None)

    events = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert events[0]["event"] == "serving" and events[0]["node_id"] == "node-1"
    trained = [e for e in events if e["message"].startswith("round ") and "trained" in e["message"]]
    assert len(trained) == ROUNDS


def test_report_of_the_network_run(network_run: NetworkRun) -> None:
    done = run_cli("report", str(network_run.folder / "run"))

    assert done.returncode == 0, done.stderr
    page = (network_run.folder / "run" / "report.html").read_text()
    assert list(embedded_images(page)) == [name for name, _, _ in PLOTS]
    assert page.count("<td>node-2</td><td>signature</td>") == ROUNDS - 1
    assert page.count("<td>node-2</td><td>benched</td>") == 1
    picture = matplotlib.image.imread(network_run.folder / "run" / "report.png")
    assert picture.ndim == 3 and picture.shape[0] > 600


def test_a_node_without_a_free_connection_counts_a_busy_request(tmp_path: Path) -> None:
    # Prepare: a node with room for one connection, kept busy by a long training request
    deployment = Deployment(tmp_path, count=1)
    long_rounds = tmp_path / "long.json"
    long_rounds.write_text(TrainingConfig(local_steps=20_000).model_dump_json())
    options = ("--max-connections", "1", "--allow-unsigned-requests", "--config", str(long_rounds))
    body = json.dumps({"round_id": 1, "global_weights": {}}).encode()
    with running([deployment.local_node(0, *options)]) as (node,):
        host, port = node.address.split(":")
        busy = socket.create_connection((host, int(port)), timeout=REQUEST_TIMEOUT)
        try:  # a complete request: the one connection trains for seconds
            busy.sendall(
                b"POST /train HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"authorization: Bearer " + deployment.token + b"\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            time.sleep(0.5)

            # Execute: one more connection while it trains
            refused = socket.create_connection((host, int(port)), timeout=REQUEST_TIMEOUT)
            with refused:
                try:
                    closed = refused.recv(1) == b""
                except ConnectionResetError:
                    closed = True
            busy.recv(1)  # the training answer: the connection is free again
        finally:
            busy.close()
        attempts = 0
        while True:  # until the server has seen the busy connection close
            attempts += 1
            try:
                answer = scrape(node, deployment.token)
                break
            except httpx.TransportError:
                assert attempts < 100
                time.sleep(0.1)
        values = metric_values(answer.text)

    # Assert
    assert closed
    assert values[("fedtrain_node_requests_total", (("outcome", "busy"),))] == attempts
