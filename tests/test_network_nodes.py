"""Real node processes on 127.0.0.1 and the coordinator: runs, failures, attacks and TLS.

Every node is an ``aumai-fedtrain node`` child process on a free loopback port (or, for the
misbehaving ones, a uvicorn server or a raw socket server in a thread of this process); every
request and every command has a timeout, and every process and server is stopped in a
``finally``.
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import hashlib
import io
import ipaddress
import json
import logging
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route

from aumai_fedtrain import (
    DiLoCoCoordinator,
    FederatedNode,
    GlobalState,
    LocalUpdate,
    TrainingConfig,
    TrainingResult,
)
from aumai_fedtrain.cli import main
from aumai_fedtrain.models import TensorMap
from aumai_fedtrain.network import (
    JSON,
    SAFETENSORS,
    HttpUpdateProvider,
    LocalNode,
    NodeSettings,
    QuorumError,
    TrainRequest,
    create_app,
    verify_update,
)
from aumai_fedtrain.network.auth import (
    NODE_NONCE_HEADER,
    NONCE_HEADER,
    REQUEST_SIGNATURE_HEADER,
    ROUND_HEADER,
    SIGNATURE_HEADER,
    sign_request,
    sign_update,
)
from aumai_fedtrain.network.provider import MAX_BACKOFF_SECONDS
from aumai_fedtrain.network.server import listen
from aumai_fedtrain.network.wire import decode_update, encode_request, encode_update
from aumai_fedtrain.simulation import (
    SimulationProvider,
    SimulationTrainer,
    initial_model,
    simulated_nodes,
)
from tests.helpers import function_trainer, run_cli
from tests.test_examples import EXAMPLES
from tests.test_network_wire import handmade_safetensors

REQUEST_TIMEOUT = 30.0
COMMAND_TIMEOUT = 120.0
SAMPLES_PER_ROUND = TrainingConfig().local_steps * TrainingConfig().batch_size
LOGGER = "aumai_fedtrain.network"


def write_secret(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    return path


@contextmanager
def running(nodes: list[LocalNode]) -> Iterator[list[LocalNode]]:
    """Start the nodes together, wait until all serve, and stop them all in the end."""
    try:
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_ready()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


class Deployment:
    """Key files, a token and the nodes of a test run."""

    def __init__(self, folder: Path, count: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.token_file = write_secret(folder, "coordinator.token")
        self.key_files = {f"node-{i}": write_secret(folder, f"node-{i}.key") for i in range(count)}

    @property
    def token(self) -> bytes:
        return self.token_file.read_text().strip().encode()

    def keys(self) -> dict[str, bytes]:
        return {
            node_id: path.read_text().strip().encode() for node_id, path in self.key_files.items()
        }

    def local_node(
        self, index: int, *extra: str, port: int | None = None, ca_file: Path | None = None
    ) -> LocalNode:
        node_id = f"node-{index}"
        args = ["--shard", str(index), "--token-file", str(self.token_file), "--max-body-mb", "1"]
        return LocalNode(
            node_id, self.key_files[node_id], [*args, *extra], port=port, ca_file=ca_file
        )

    def nodes_file(self, nodes: list[LocalNode]) -> Path:
        path = self.folder / "nodes.json"
        entries = [
            {"node_id": n.node_id, "address": n.address, "key_file": self.key_files[n.node_id].name}
            for n in nodes
        ]
        path.write_text(json.dumps(entries))
        return path


def signed(
    client: httpx.Client,
    base_url: str,
    key: bytes,
    node_id: str,
    round_id: int,
    body: bytes,
    headers: dict[str, str],
    nonce: str = "",
) -> dict[str, str]:
    """``headers`` and what signs a ``POST /train`` of ``body``: a nonce from the node (asked
    with ``headers``' token) and the HMAC by ``key``, as the coordinator sends them."""
    answer = client.get(f"{base_url}/nonce", headers=headers)
    assert answer.status_code == 200, answer.text
    node_nonce = answer.json()["nonce"]
    digest = hashlib.sha256(body).hexdigest()
    return {
        **headers,
        NONCE_HEADER: nonce,
        NODE_NONCE_HEADER: node_nonce,
        ROUND_HEADER: str(round_id),
        REQUEST_SIGNATURE_HEADER: sign_request(key, node_id, round_id, node_nonce, nonce, digest),
    }


def federated(nodes: list[LocalNode]) -> list[FederatedNode]:
    return [FederatedNode(node_id=node.node_id, address=node.address) for node in nodes]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return Deployment(tmp_path_factory.mktemp("deployment"), count=3)


@pytest.fixture(scope="module")
def cluster(deployment: Deployment) -> Iterator[list[LocalNode]]:
    """Three honest nodes (shards 0-2) that need the coordinator's token."""
    with running([deployment.local_node(i) for i in range(3)]) as nodes:
        yield nodes


def simulate(rounds: int, num_nodes: int = 3) -> TrainingResult:
    """The same run in one process with the built-in simulation."""
    config = TrainingConfig(num_nodes=num_nodes, global_rounds=rounds)
    nodes = simulated_nodes(num_nodes)  # shards 0, 1, 2, as the nodes' --shard
    return DiLoCoCoordinator().run_training(config, nodes, SimulationProvider())


def assert_same_history(summary: dict[str, Any], reference: TrainingResult) -> None:
    assert [r["avg_loss"] for r in summary["history"]] == [r.avg_loss for r in reference.history]
    assert [r["eval_loss"] for r in summary["history"]] == [r.eval_loss for r in reference.history]
    assert summary["total_samples"] == reference.total_samples


def test_cli_run_with_three_nodes_reproduces_the_simulation(
    deployment: Deployment, cluster: list[LocalNode], tmp_path: Path
) -> None:
    nodes_file = deployment.nodes_file(cluster)

    completed = run_cli(
        "run", "--nodes-file", str(nodes_file), "--token-file", str(deployment.token_file),
        "--rounds", "3", "--json", cwd=tmp_path,
    )  # fmt: skip

    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout)
    assert summary["rounds_completed"] == 3 and summary["num_nodes"] == 3
    assert summary["credits"] == {f"node-{i}": 3 * SAMPLES_PER_ROUND for i in range(3)}
    assert_same_history(summary, simulate(rounds=3))


@pytest.mark.parametrize("wire", ["binary", "json"])
def test_both_wire_formats_give_the_simulations_parameters_bit_for_bit(
    deployment: Deployment, cluster: list[LocalNode], wire: Literal["binary", "json"]
) -> None:
    provider = HttpUpdateProvider(
        deployment.keys(),
        token=deployment.token,
        model_init=initial_model,
        wire=wire,
        timeout=REQUEST_TIMEOUT,
    )
    config = TrainingConfig(num_nodes=3, global_rounds=2)

    result = DiLoCoCoordinator().run_training(config, federated(cluster), provider)

    reference = simulate(rounds=2).final_state.parameters
    assert reference is not None and result.final_state.parameters is not None
    for key, value in reference.items():
        assert result.final_state.parameters[key].tobytes() == value.tobytes()
    assert provider.failures == {1: {}, 2: {}}


def test_bad_requests_get_4xx_and_the_node_keeps_serving(
    deployment: Deployment, cluster: list[LocalNode]
) -> None:
    node = cluster[0]
    url = f"{node.url}/train"
    key = deployment.keys()["node-0"]
    auth = {"authorization": f"Bearer {deployment.token.decode()}"}
    json_type = {"content-type": JSON, **auth}
    weights = initial_model(TrainingConfig())
    late = 10**9
    binary = encode_request(TrainRequest(round_id=late, global_weights=weights), SAFETENSORS)
    # (headers, body, signed for this round or None, status, part of the detail)
    cases: list[tuple[dict[str, str], bytes, int | None, int, str]] = [
        ({"content-type": JSON}, b"{}", None, 401, "a bearer token is required"),
        ({"content-type": JSON, "authorization": "Basic abc"}, b"{}", None, 401, "bearer token"),
        (
            {"content-type": JSON, "authorization": "Bearer " + "0" * 64},
            b"{}", None, 403, "wrong token",
        ),
        ({"content-type": "text/plain", **auth}, b"{}", None, 415, "unsupported content type"),
        (auth, b"{}", None, 415, "unsupported content type"),
        ({**json_type, NONCE_HEADER: "not hex"}, b'{"round_id": 1}', None, 400, "hex"),
        (json_type, b'{"round_id": 1}', None, 401, "unsigned request"),
        (json_type, b'{"round_id": 1, "global_weights": {', 1, 400, "Invalid JSON"),
        (json_type, b'{"round_id": 1, "weights": {}}', 1, 400, "unknown key 'weights'"),
        (json_type, b'{"round_id": 2}', 1, 400, "X-Fedtrain-Round says round 1, the body round 2"),
        ({"content-type": SAFETENSORS, **auth}, b"\x00" * 64, 1, 400, "malformed safetensors"),
        ({"content-type": SAFETENSORS, **auth}, binary[:-8], late, 400, "malformed safetensors"),
        (json_type, b" " * (1024 * 1024 + 1), 1, 413, "exceeds the limit of 1048576 bytes"),
        ({"content-type": SAFETENSORS, **auth}, binary + b"\0" * 2**20, late, 413, "exceeds"),
        (
            json_type,
            b'{"round_id": %d, "global_weights": {"w": [1.0, 2.0]}}' % late,
            late,
            422,
            "do not match the built-in model",
        ),
        (
            json_type,
            json.dumps({"round_id": 1, "global_weights": {"layer1.bias": [float("nan")]}}).encode(),
            1,
            422,
            "non-finite",
        ),
    ]  # fmt: skip
    with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
        for headers, body, round_id, status, needle in cases:
            if round_id is not None:
                headers = signed(client, node.url, key, "node-0", round_id, body, headers)
            response = client.post(url, content=body, headers=headers)
            assert (response.status_code, needle in response.json()["detail"]) == (status, True), (
                headers,
                response.text,
            )
        assert client.get(url).status_code == 405
        assert client.get(f"{node.url}/nonce").status_code == 401  # the token is needed
        before = client.get(f"{node.url}/health").json()["rounds_trained"]
        nonce = "ab" * 16
        binary_type = {"content-type": SAFETENSORS, "accept": SAFETENSORS, **auth}
        good = client.post(
            url,
            content=binary,
            headers=signed(client, node.url, key, "node-0", late, binary, binary_type, nonce),
        )
        health = client.get(f"{node.url}/health").json()

    assert good.status_code == 200 and good.headers["content-type"] == SAFETENSORS
    update = decode_update(good.content, good.headers["content-type"])
    assert (update.node_id, update.round_id, update.samples_used) == (
        "node-0",
        late,
        SAMPLES_PER_ROUND,
    )
    assert verify_update(key, update, good.headers[SIGNATURE_HEADER], nonce)
    assert health == {
        "status": "ok",
        "node_id": "node-0",
        "trainer": "built-in simulation, shard 0",
        "rounds_trained": before + 1,
    }


class Rogue:
    """A man in the middle in front of a real node app, misbehaving as ``mode`` says.

    ``tamper`` changes one gradient value by the smallest possible amount and keeps the
    signature; ``unsigned`` drops the signature; ``replay`` answers every round with the node's
    first (authentic) answer; ``impersonate`` passes the update off as node-0's, signed with
    ``key`` (the rogue node's own).
    """

    FORWARDED = (
        "content-type", "accept", "authorization", NONCE_HEADER.lower(),
        NODE_NONCE_HEADER.lower(), ROUND_HEADER.lower(), REQUEST_SIGNATURE_HEADER.lower(),
    )  # fmt: skip

    def __init__(self, inner: Starlette, mode: str, key: bytes = b"") -> None:
        self.inner = inner
        self.mode = mode
        self.key = key
        self.first: tuple[bytes, dict[str, str]] | None = None
        self.app = Starlette(
            routes=[
                Route("/train", self.train, methods=["POST"]),
                Route("/nonce", self.nonce, methods=["GET"]),
            ]
        )

    async def forward(self, request: Request, method: str, path: str) -> httpx.Response:
        headers = {name: value for name, value in request.headers.items() if name in self.FORWARDED}
        transport = httpx.ASGITransport(app=self.inner)
        async with httpx.AsyncClient(transport=transport, base_url="http://inner") as client:
            return await client.request(method, path, content=await request.body(), headers=headers)

    async def nonce(self, request: Request) -> Response:
        answer = await self.forward(request, "GET", "/nonce")
        return Response(answer.content, answer.status_code, media_type=JSON)

    async def train(self, request: Request) -> Response:
        answer = await self.forward(request, "POST", "/train")
        content = answer.content
        headers = {"content-type": answer.headers["content-type"]}
        headers[SIGNATURE_HEADER] = answer.headers[SIGNATURE_HEADER]
        if self.mode == "tamper":
            update = decode_update(content, headers["content-type"])
            first_key = next(iter(update.gradients))
            update.gradients[first_key].flat[0] = np.nextafter(
                update.gradients[first_key].flat[0], np.inf
            )
            content = encode_update(update, headers["content-type"])
        elif self.mode == "unsigned":
            del headers[SIGNATURE_HEADER]
        elif self.mode == "replay":
            if self.first is None:
                self.first = (content, headers)
            content, headers = self.first
        elif self.mode == "impersonate":
            update = decode_update(content, headers["content-type"])
            update.node_id = "node-0"
            content = encode_update(update, headers["content-type"])
            nonce = request.headers.get(NONCE_HEADER, "")
            headers[SIGNATURE_HEADER] = sign_update(self.key, update, nonce)
        return Response(content, status_code=answer.status_code, headers=headers)


@contextmanager
def serve_in_thread(app: Starlette) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free loopback port; yield ``host:port``."""
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    assert not thread.is_alive()


def failing_trainer(round_id: int, weights: TensorMap, config: TrainingConfig) -> Any:
    raise RuntimeError("out of memory")


def wrong_model_trainer(round_id: int, weights: TensorMap, config: TrainingConfig) -> Any:
    return {"w": np.zeros(3)}, 1.0, 10


def test_tampered_forged_replayed_and_broken_updates_are_dropped_and_the_run_goes_on(
    deployment: Deployment, cluster: list[LocalNode], caplog: pytest.LogCaptureFixture
) -> None:
    config = TrainingConfig()
    keys = deployment.keys()
    rogue_keys = {f"node-{i}": secrets.token_hex(32).encode() for i in range(3, 10)}

    def node_app(node_id: str, key: bytes, trainer: Any = None) -> Starlette:
        factory = function_trainer(trainer) if trainer is not None else SimulationTrainer
        return create_app(
            NodeSettings(node_id=node_id, key=key, trainer_factory=factory, config=config)
        )

    rogues = {
        "node-3": Rogue(node_app("node-3", rogue_keys["node-3"]), "tamper").app,
        "node-4": node_app("node-4", secrets.token_hex(32).encode()),  # not the key we know
        "node-5": Rogue(node_app("node-5", rogue_keys["node-5"]), "replay").app,
        "node-6": Rogue(node_app("node-6", rogue_keys["node-6"]), "unsigned").app,
        "node-7": Rogue(
            node_app("node-7", rogue_keys["node-7"]), "impersonate", rogue_keys["node-7"]
        ).app,
        "node-8": node_app("node-8", rogue_keys["node-8"], wrong_model_trainer),
        "node-9": node_app("node-9", rogue_keys["node-9"], failing_trainer),
    }
    caplog.set_level(logging.INFO, logger=LOGGER)
    app = Starlette(routes=[Mount(f"/{node_id}", app=a) for node_id, a in rogues.items()])
    with serve_in_thread(app) as address:
        nodes = federated(cluster) + [
            FederatedNode(node_id=node_id, address=f"{address}/{node_id}") for node_id in rogues
        ]
        provider = HttpUpdateProvider(
            {**keys, **rogue_keys},
            token=deployment.token,
            min_nodes=3,
            timeout=REQUEST_TIMEOUT,
            model_init=initial_model,
        )
        result = DiLoCoCoordinator().run_training(
            TrainingConfig(num_nodes=len(nodes), global_rounds=3), nodes, provider
        )

    assert result.rounds_completed == 3
    assert result.credits == {
        **{f"node-{i}": 3 * SAMPLES_PER_ROUND for i in range(3)},
        "node-5": SAMPLES_PER_ROUND,  # its first, authentic answer counted
        **{node_id: 0 for node_id in rogues if node_id != "node-5"},
    }
    expected = {
        "node-3": "bad signature: tampered with, or signed with another key",
        "node-4": "bad request signature: node-4 does not hold the key this coordinator has",
        "node-5": "replayed or stale update for round 1, expected round ROUND",
        "node-6": "unsigned update (no X-Fedtrain-Signature header)",
        "node-7": "the answer is an update of node 'node-0'",
        "node-8": "does not match the model: missing keys ['layer1.bias', ",
        "node-9": 'HTTP 500: {"detail":"the trainer failed: RuntimeError: out of memory"}',
    }
    for round_id in (1, 2, 3):
        failures = provider.failures[round_id]
        for node_id, reason in expected.items():
            if node_id == "node-5" and round_id == 1:
                assert node_id not in failures
                continue
            assert failures[node_id].startswith(reason.replace("ROUND", str(round_id))), failures[
                node_id
            ]
            assert f"round {round_id}: no update from {node_id}: {failures[node_id]}" in caplog.text
    assert len(result.final_state.participating_nodes) == 3


def test_a_straggler_is_dropped_after_the_timeout_and_not_asked_again(
    deployment: Deployment, cluster: list[LocalNode], caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()

    def stuck(round_id: int, weights: TensorMap, config: TrainingConfig) -> Any:
        release.wait(timeout=COMMAND_TIMEOUT)  # answers only once the run is over
        return {key: np.zeros_like(value) for key, value in weights.items()}, 1.0, 1

    key = secrets.token_hex(32).encode()
    caplog.set_level(logging.INFO, logger=LOGGER)
    app = create_app(
        NodeSettings(node_id="node-3", key=key, trainer_factory=function_trainer(stuck))
    )
    with serve_in_thread(app) as address:
        try:
            nodes = [*federated(cluster), FederatedNode(node_id="node-3", address=address)]
            provider = HttpUpdateProvider(
                {**deployment.keys(), "node-3": key},
                token=deployment.token,
                min_nodes=3,
                timeout=1,
                model_init=initial_model,
            )
            result = DiLoCoCoordinator().run_training(
                TrainingConfig(num_nodes=4, global_rounds=2), nodes, provider
            )
        finally:
            release.set()

    assert result.rounds_completed == 2
    assert result.credits == {
        **{f"node-{i}": 2 * SAMPLES_PER_ROUND for i in range(3)},
        "node-3": 0,
    }
    assert provider.failures == {
        1: {"node-3": "no answer within 1 s"},
        2: {"node-3": "no answer within 1 s"},
    }
    assert "retry" not in caplog.text


def test_a_killed_node_stops_earning_and_the_run_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    deployment = Deployment(tmp_path, count=3)
    caplog.set_level(logging.INFO, logger=LOGGER)
    with running([deployment.local_node(i) for i in range(3)]) as nodes:
        provider = HttpUpdateProvider(
            deployment.keys(), token=deployment.token, min_nodes=2, retries=1, backoff=0.01,
            timeout=REQUEST_TIMEOUT, model_init=initial_model,
        )  # fmt: skip

        def kill_after_round_two(record: Any) -> None:
            if record.round_id == 2:
                nodes[2].kill()

        result = DiLoCoCoordinator().run_training(
            TrainingConfig(num_nodes=3, global_rounds=4),
            federated(nodes),
            provider,
            on_round=kill_after_round_two,
        )

    assert result.rounds_completed == 4
    assert result.credits == {
        "node-0": 4 * SAMPLES_PER_ROUND,
        "node-1": 4 * SAMPLES_PER_ROUND,
        "node-2": 2 * SAMPLES_PER_ROUND,
    }
    assert [r.num_participants for r in result.history] == [3, 3, 2, 2]
    for round_id in (3, 4):
        assert provider.failures[round_id].keys() == {"node-2"}
        assert provider.failures[round_id]["node-2"].startswith("cannot reach http://127.0.0.1:")
        assert f"round {round_id}: node-2 failed (cannot reach" in caplog.text
        assert "retry 1/1 in 0.01 s" in caplog.text


def test_a_failed_quorum_keeps_the_last_checkpoint_and_the_run_resumes(tmp_path: Path) -> None:
    deployment = Deployment(tmp_path / "deployment", count=2)
    checkpoints = tmp_path / "checkpoints"
    with running([deployment.local_node(i) for i in range(2)]) as nodes:
        nodes_file = deployment.nodes_file(nodes)
        common = [
            "run", "--nodes-file", str(nodes_file), "--token-file", str(deployment.token_file),
            "--checkpoint-dir", str(checkpoints), "--min-nodes", "2", "--json",
        ]  # fmt: skip
        first = run_cli(*common, "--rounds", "2", cwd=tmp_path)
        saved = (checkpoints / "checkpoint.safetensors").read_bytes()
        nodes[1].kill()
        failed = run_cli(*common, "--rounds", "4", "--resume", cwd=tmp_path)
        after_failure = (checkpoints / "checkpoint.safetensors").read_bytes()
        with running([deployment.local_node(1, port=nodes[1].port)]):
            resumed = run_cli(*common, "--rounds", "4", "--resume", cwd=tmp_path)

    assert first.returncode == 0, first.stderr
    assert failed.returncode == 1, failed.stderr
    (error,) = failed.stderr.strip().splitlines()  # the reason is in it
    assert error.startswith(
        "Error: QuorumError: round 3: 1 of 2 nodes sent a valid update, the quorum is 2 "
        "(node-1: cannot reach http://127.0.0.1:"
    )
    assert after_failure == saved
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["rounds_completed"] == 4
    assert summary["credits"] == {"node-0": 4 * SAMPLES_PER_ROUND, "node-1": 4 * SAMPLES_PER_ROUND}
    # The restarted node lost its inner AdamW state (it lives on the node), so only the rounds
    # before the failure match the simulation, whose nodes never restart.
    before_failure = {"history": summary["history"][:2], "total_samples": 4 * SAMPLES_PER_ROUND}
    assert_same_history(before_failure, simulate(rounds=2, num_nodes=2))
    assert [r["num_participants"] for r in summary["history"]] == [2, 2, 2, 2]


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signed for 127.0.0.1 (IP SAN): (ca, cert, key) PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def certificate(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
        signer: ec.EllipticCurvePrivateKey, extensions: list[tuple[x509.ExtensionType, bool]],
    ) -> x509.Certificate:  # fmt: skip
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer.subject if issuer is not None else name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
            )
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical)
        return builder.sign(signer, hashes.SHA256())

    def key_usage(*enabled: str) -> x509.KeyUsage:
        names = (
            "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
            "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only",
        )  # fmt: skip
        return x509.KeyUsage(**{name: name in enabled for name in names})

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate(
        "aumai-fedtrain test CA", ca_key, None, ca_key,
        [
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (key_usage("key_cert_sign", "crl_sign"), True),
        ],
    )  # fmt: skip
    node_key = ec.generate_private_key(ec.SECP256R1())
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    node_cert = certificate(
        "127.0.0.1", node_key, ca, ca_key,
        [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (key_usage("digital_signature"), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            (x509.SubjectAlternativeName([loopback]), False),
        ],
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    paths = folder / "ca.pem", folder / "node.pem", folder / "node-key.pem"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(node_cert.public_bytes(pem))
    paths[2].write_bytes(
        node_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def test_a_tls_run_with_a_certificate_made_here(tmp_path: Path) -> None:
    deployment = Deployment(tmp_path, count=1)
    ca, cert, key = make_certificates(tmp_path)
    node = deployment.local_node(
        0, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), ca_file=ca
    )
    target = [FederatedNode(node_id="node-0", address=f"https://{node.address}")]
    untrusted = HttpUpdateProvider(deployment.keys(), token=deployment.token, timeout=10)
    with running([node]):
        nodes_file = deployment.nodes_file([node])
        completed = run_cli(
            "run", "--nodes-file", str(nodes_file), "--token-file", str(deployment.token_file),
            "--ca-file", str(ca), "--rounds", "2", "--json", cwd=tmp_path,
        )  # fmt: skip
        with pytest.raises(QuorumError) as not_verified:
            untrusted.get_updates(1, GlobalState(), target)

    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout)
    assert summary["credits"] == {"node-0": 2 * SAMPLES_PER_ROUND}
    assert_same_history(summary, simulate(rounds=2, num_nodes=1))
    assert "CERTIFICATE_VERIFY_FAILED" in str(not_verified.value)

    assert untrusted.failures[1]["node-0"].startswith("cannot reach https://127.0.0.1:")


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Run the CLI in this process; its exit code and stderr."""
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    return int(exited.value.code or 0), capsys.readouterr().err


def test_node_command_rejects_bad_options_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = write_secret(tmp_path, "node.key")
    short = tmp_path / "short.key"
    short.write_text("abc")
    base = ["node", "--port", "0", "--node-id", "n"]
    with socket.create_server(("127.0.0.1", 0)) as busy:
        busy_port = str(busy.getsockname()[1])
        cases = [
            ([*base, "--key-file", str(tmp_path / "none.key")], "cannot read key file"),
            ([*base, "--key-file", str(short)], "has 3 characters; use at least 32"),
            ([*base, "--key-file", str(key), "--token-file", str(short)], "token file"),
            ([*base, "--key-file", str(key), "--trainer", "nocolon"], "module:function"),
            ([*base, "--key-file", str(key), "--trainer", "no_such_module_x:f"], "cannot import"),
            ([*base, "--key-file", str(key), "--trainer", "json:no_such"], "has no function"),
            ([*base, "--key-file", str(key), "--trainer", "json:loads", "--shard", "1"], "--shard"),
            ([*base, "--key-file", str(key), "--ssl-certfile", str(key)], "go together"),
            (
                [
                    *base,
                    "--key-file",
                    str(key),
                    "--ssl-certfile",
                    str(key),
                    "--ssl-keyfile",
                    str(key),
                ],
                "cannot load --ssl-certfile/--ssl-keyfile",
            ),
            (
                ["node", "--port", busy_port, "--node-id", "n", "--key-file", str(key)],
                f"cannot listen on 127.0.0.1:{busy_port}",
            ),
        ]
        for args, needle in cases:
            code, err = run_main(capsys, *args)
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and needle in lines[0], (args, err)


def test_run_rejects_bad_network_options_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deployment = Deployment(tmp_path, count=2)
    nodes_file = tmp_path / "nodes.json"
    nodes_file.write_text(
        json.dumps([{"node_id": "node-0", "address": "127.0.0.1:9", "key_file": "node-0.key"}])
    )
    bad_file = tmp_path / "bad.json"
    bad_file.write_text('[{"node_id": "node-0"}]')
    cases = [
        (["run", "--token-file", str(deployment.token_file)], "--token-file needs --nodes-file"),
        (["run", "--timeout", "2"], "--timeout needs --nodes-file"),
        (["run", "--nodes-file", str(nodes_file), "--nodes", "2"], "--nodes cannot go with"),
        (["run", "--nodes-file", str(bad_file)], "entry 0: address: Field required"),
        (["run", "--nodes-file", str(nodes_file), "--min-nodes", "2"], "--min-nodes 2 exceeds"),
        (["run", "--nodes-file", str(nodes_file), "--ca-file", str(nodes_file)], "CA file"),
        (["run", "--nodes-file", str(nodes_file), "--timeout", "0"], "--timeout"),
        (["run", "--nodes-file", str(nodes_file), "--timeout", "inf"], "a finite timeout > 0"),
        (["run", "--nodes-file", str(nodes_file), "--timeout", "nan"], "a finite timeout > 0"),
    ]
    for args, needle in cases:
        code, err = run_main(capsys, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and needle in lines[0], (args, err)


def post_in_process(trainer: Callable[..., Any], body: dict[str, Any]) -> httpx.Response:
    """POST ``body`` (unsigned) to a node app with ``trainer``, served in a thread."""
    settings = NodeSettings(
        node_id="n",
        key=b"k" * 32,
        trainer_factory=function_trainer(trainer),
        allow_unsigned_requests=True,
    )
    with serve_in_thread(create_app(settings)) as address:
        return httpx.post(f"http://{address}/train", json=body, timeout=REQUEST_TIMEOUT)


def test_trainer_plugins_get_their_errors_reported() -> None:
    def refusing(round_id: int, weights: TensorMap, config: TrainingConfig) -> Any:
        raise ValueError("weights from another model")

    def sloppy(round_id: int, weights: TensorMap, config: TrainingConfig) -> Any:
        return {"w": [1.0]}, 0.5

    def non_integer_samples(round_id: int, weights: TensorMap, config: TrainingConfig) -> Any:
        return {"w": [1.0]}, 0.5, 12.5

    def empty_weights_seen(round_id: int, weights: TensorMap, config: TrainingConfig) -> Any:
        return {"w": np.array([float(len(weights))])}, 0.25, np.int64(7)

    cases: list[tuple[Callable[..., Any], int, str]] = [
        (refusing, 422, "the trainer cannot use this request: weights from another model"),
        (sloppy, 500, "not enough values to unpack"),
        (non_integer_samples, 500, "samples_used"),
    ]
    for trainer, status, needle in cases:
        answer = post_in_process(trainer, {"round_id": 2})
        assert answer.status_code == status and needle in answer.json()["detail"], answer.text
    answer = post_in_process(empty_weights_seen, {"round_id": 2, "global_weights": {}})
    assert answer.status_code == 200
    assert answer.json() == {
        "node_id": "n", "round_id": 2, "gradients": {"w": [0.0]}, "loss": 0.25, "samples_used": 7,
    }  # fmt: skip


def run_example(name: str, cwd: Path) -> str:
    """Run an example that starts node processes; its output.

    The example runs in a process group of its own, killed as a whole in the end, so that its
    nodes go too when it fails or times out before it could stop them.
    """
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / name)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
    assert process.returncode == 0, stderr
    return stdout


def test_the_guides_pattern3_provider_trains_a_round_on_a_real_node(tmp_path: Path) -> None:
    output = run_example("pattern3_http_provider.py", tmp_path)

    first = simulate(rounds=1, num_nodes=1).history[0]
    assert "Update from node-0 for round 1:" in output
    assert f"loss {first.avg_loss:.6f}, {SAMPLES_PER_ROUND} samples" in output
    assert "layer1.weight: shape (256, 32)" in output
    assert f"Credits: {{'node-0': {SAMPLES_PER_ROUND}}}" in output


def test_the_custom_trainer_example_learns_the_regression(tmp_path: Path) -> None:
    output = run_example("custom_trainer.py", tmp_path)

    losses = [float(x) for x in re.findall(r"train MSE ([0-9.]+)", output)]
    found = re.search(r"\|w - w_true\| = ([0-9.]+)", output)
    assert found is not None, output
    distance = float(found.group(1))
    assert len(losses) == 10 and losses[-1] < losses[0] / 10
    assert distance < 0.1
    assert 'Credits: {"lab-a": 6400, "lab-b": 6400}' in output


Answer = Callable[[socket.socket, bytes, threading.Event], None]
"""What a raw node does with a connection: ``(connection, request, stop event)``."""


def read_request(conn: socket.socket) -> bytes:
    """One HTTP request (its head, the blank line and its ``Content-Length`` body) from ``conn``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    found = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    length = int(found.group(1)) if found else 0
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


@contextmanager
def raw_node(
    answer: Answer, tls: ssl.SSLContext | None = None
) -> Iterator[tuple[str, list[bytes]]]:
    """A TCP (or, with ``tls``, TLS) server on a free loopback port; ``answer`` writes its answers.

    It hands out a nonce for every ``GET /nonce`` itself; ``answer`` answers every other
    request. Yields ``host:port`` and the list of those other requests (head and body). Every
    connection is served in a thread; ``answer`` gets a stop event, set (and all threads
    joined) on exit.
    """
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.05)
    stop = threading.Event()
    heads: list[bytes] = []
    threads: list[threading.Thread] = []

    def handle(conn: socket.socket) -> None:
        try:
            conn.settimeout(REQUEST_TIMEOUT)
            if tls is not None:
                conn = tls.wrap_socket(conn, server_side=True)
            request = read_request(conn)
            if request.startswith(b"GET /nonce "):
                nonce = json.dumps({"nonce": secrets.token_hex(16)}).encode()
                conn.sendall(http_answer(nonce, JSON))
                return
            heads.append(request)
            answer(conn, request, stop)
        except OSError:
            pass  # the client hung up: what a misbehaving node gets
        finally:
            conn.close()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=handle, args=(conn,), daemon=True)
            threads.append(thread)
            thread.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}", heads
    finally:
        stop.set()
        for thread in [acceptor, *threads]:
            thread.join(timeout=REQUEST_TIMEOUT)
        server.close()
    assert not any(thread.is_alive() for thread in [acceptor, *threads])


def trickle(prefix: bytes, drip: bytes) -> Answer:
    """An answer that sends ``prefix``, then ``drip`` every 0.1 s until stopped."""

    def answer(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
        conn.sendall(prefix)
        while not stop.wait(0.1):
            conn.sendall(drip)

    return answer


def fixed(data: bytes) -> Answer:
    """An answer that sends ``data`` (whatever it is) and hangs up."""

    def answer(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
        conn.sendall(data)

    return answer


def http_answer(body: bytes, content_type: str = SAFETENSORS, **headers: str) -> bytes:
    """A 200 answer with ``body``; ``content_length="5"`` style keywords add headers."""
    lines = [b"HTTP/1.1 200 OK", f"content-type: {content_type}".encode()]
    lines += [f"{name.replace('_', '-')}: {value}".encode() for name, value in headers.items()]
    if "content_length" not in headers:
        lines.append(f"content-length: {len(body)}".encode())
    return b"\r\n".join([*lines, b"", body])


def ask_within_bound(
    provider: HttpUpdateProvider, nodes: list[FederatedNode], state: GlobalState | None = None
) -> tuple[list[LocalUpdate] | QuorumError, float]:
    """Round 1 of ``provider`` from ``state`` (its updates or its QuorumError) and its seconds.

    The round runs in a thread given COMMAND_TIMEOUT: the test fails, rather than hangs, when a
    node holds the round.
    """
    outcome: list[tuple[list[LocalUpdate] | QuorumError, float]] = []

    def ask() -> None:
        started = time.monotonic()
        try:
            result: list[LocalUpdate] | QuorumError = provider.get_updates(
                1, state or GlobalState(), nodes
            )
        except QuorumError as exc:
            result = exc
        outcome.append((result, time.monotonic() - started))

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join(timeout=COMMAND_TIMEOUT)
    assert not asking.is_alive(), "a misbehaving node held the round past its timeout"
    return outcome[0]


def test_answers_that_trickle_overflow_or_break_are_dropped_within_the_timeout(
    deployment: Deployment, cluster: list[LocalNode]
) -> None:
    metadata = {"aumai-fedtrain": "local-update/1", "node_id": "65-dimensions", "round_id": "1",
                "loss": "1.0", "samples_used": "1"}  # fmt: skip
    status = b"HTTP/1.1 200 OK\r\n"
    chunked = b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    answers: dict[str, Answer] = {
        "headers-trickle": trickle(status, b"x-a: b\r\n"),  # never ends its head
        "body-trickle": trickle(status + chunked, b"1\r\n \r\n"),  # nor its body
        "declared-too-large": fixed(http_answer(b"", content_length=str(10**6))),
        "streamed-too-large": trickle(status + chunked, b"10000\r\n" + bytes(2**16) + b"\r\n"),
        "gzip": fixed(http_answer(gzip.compress(bytes(10**6)), content_encoding="gzip")),
        "65-dimensions": fixed(http_answer(handmade_safetensors(metadata, "F64", [1] * 65, 8))),
    }
    expected = {
        "headers-trickle": "no answer within 5 s",
        "body-trickle": "no answer within 5 s",
        "declared-too-large": f"answer of {10**6} bytes exceeds the limit of {2**18} bytes",
        "streamed-too-large": f"answer exceeds the limit of {2**18} bytes",
        "gzip": "answer has content-encoding 'gzip'; only 'identity' is accepted",
        "65-dimensions": "malformed answer: malformed safetensors body (maximum supported",
    }
    keys = {**deployment.keys(), **{name: b"k" * 32 for name in answers}}
    provider = HttpUpdateProvider(
        keys, token=deployment.token, timeout=5, retries=0, max_response_bytes=2**18,
        model_init=initial_model,
    )  # fmt: skip
    with ExitStack() as stack:
        nodes = [FederatedNode(node_id="node-0", address=cluster[0].address)]
        heads: dict[str, list[bytes]] = {}
        for name, answer in answers.items():
            address, heads[name] = stack.enter_context(raw_node(answer))
            nodes.append(FederatedNode(node_id=name, address=address))
        updates, seconds = ask_within_bound(provider, nodes)

    assert isinstance(updates, list) and [update.node_id for update in updates] == ["node-0"]
    assert seconds < 5 + 3
    assert provider.failures[1].keys() == expected.keys()
    for name, reason in expected.items():
        assert provider.failures[1][name].startswith(reason), provider.failures[1][name]
    assert all(len(node_heads) == 1 for node_heads in heads.values())  # no retry
    assert b"accept-encoding: identity" in heads["gzip"][0].lower()


def test_a_tls_node_that_never_finishes_its_answer_is_cut_off(tmp_path: Path) -> None:
    ca, cert, key = make_certificates(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    provider = HttpUpdateProvider({"node-0": b"k" * 32}, ca_file=ca, timeout=2, retries=0)
    answer = trickle(b"HTTP/1.1 200 OK\r\n", b"x-a: b\r\n")
    with raw_node(answer, tls) as (address, heads):
        nodes = [FederatedNode(node_id="node-0", address=address)]
        error, seconds = ask_within_bound(provider, nodes)

    assert isinstance(error, QuorumError) and len(heads) == 1 and seconds < 2 + 3
    assert provider.failures == {1: {"node-0": "no answer within 2 s"}}


def test_retries_back_off_exponentially_up_to_a_ceiling(monkeypatch: pytest.MonkeyPatch) -> None:
    from aumai_fedtrain.network import provider as provider_module

    waits: list[float] = []
    monkeypatch.setattr(
        provider_module._RoundDeadline, "sleep", lambda _, delay: waits.append(delay)
    )
    busy = fixed(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy")
    provider = HttpUpdateProvider({"node-0": b"k" * 32}, retries=4, backoff=10, timeout=600)
    with raw_node(busy) as (address, heads), pytest.raises(QuorumError, match="HTTP 503: busy"):
        provider.get_updates(1, GlobalState(), [FederatedNode(node_id="node-0", address=address)])

    assert len(heads) == 5
    assert waits == [10, 20, MAX_BACKOFF_SECONDS, MAX_BACKOFF_SECONDS]


def test_a_bug_met_by_one_answer_drops_that_node_only(
    deployment: Deployment, cluster: list[LocalNode], monkeypatch: pytest.MonkeyPatch
) -> None:
    from aumai_fedtrain.network import provider as provider_module

    def decode(body: bytes, content_type: str, expected: Any) -> Any:
        update = decode_update(body, content_type, expected)
        if update.node_id == "node-1":
            raise RuntimeError("a bug")
        return update

    monkeypatch.setattr(provider_module, "decode_update", decode)
    provider = HttpUpdateProvider(
        deployment.keys(), token=deployment.token, timeout=REQUEST_TIMEOUT
    )

    updates = provider.get_updates(1, GlobalState(), federated(cluster))

    assert sorted(update.node_id for update in updates) == ["node-0", "node-2"]
    assert provider.failures[1] == {"node-1": "cannot handle the answer: RuntimeError: a bug"}


@pytest.mark.parametrize("timeout", [float("inf"), float("nan")])
def test_provider_settings_must_be_finite(timeout: float) -> None:
    with pytest.raises(ValueError, match="finite timeout"):
        HttpUpdateProvider({"a": b"k" * 32}, timeout=timeout)
    with pytest.raises(ValueError, match="finite"):
        HttpUpdateProvider({"a": b"k" * 32}, backoff=timeout)


def test_a_streamed_request_over_the_limit_gets_413_and_the_node_keeps_serving(
    deployment: Deployment, cluster: list[LocalNode]
) -> None:
    node = cluster[0]
    headers = {"content-type": JSON, "authorization": f"Bearer {deployment.token.decode()}"}

    chunk = b" " * (512 * 1024)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the node counts while it reads
        for _ in range(3):
            yield chunk

    key = deployment.keys()["node-0"]
    with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
        headers = signed(client, node.url, key, "node-0", 1, chunk * 3, headers)
        refused = client.post(f"{node.url}/train", content=chunks(), headers=headers)
        health = client.get(f"{node.url}/health")

    assert refused.status_code == 413
    assert refused.json() == {"detail": "body exceeds the limit of 1048576 bytes"}
    assert health.status_code == 200


def test_node_settings_do_not_show_their_secrets() -> None:
    settings = NodeSettings(
        node_id="n",
        key=b"the-key" * 5,
        trainer_factory=function_trainer(failing_trainer),
        token=b"the-token" * 4,
    )

    assert "the-key" not in repr(settings) and "the-token" not in repr(settings)


def test_dropped_update_warnings_reach_the_current_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = Deployment(tmp_path, count=1)
    nodes_file = deployment.nodes_file([deployment.local_node(0)])
    code, _ = run_main(capsys, "run", "--nodes-file", str(nodes_file), "--ca-file", "absent.pem")
    assert code == 2
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)  # e.g. the next test's capture

    logging.getLogger(LOGGER).warning("round 9: no update from node-0: probe")

    assert stderr.getvalue() == "WARNING: round 9: no update from node-0: probe\n"


def test_the_node_redoes_a_retry_restarts_for_an_older_round_and_survives_failures() -> None:
    config = TrainingConfig(num_nodes=3)
    weights = initial_model(config)
    huge = {key: np.full_like(value, 1e300) for key, value in weights.items()}
    key = b"k" * 32
    app = create_app(
        NodeSettings(node_id="node-1", key=key, trainer_factory=SimulationTrainer, config=config)
    )
    reference = SimulationTrainer("node-1", config)
    expected = [reference.train(round_id, weights)[1] for round_id in (1, 2, 3)]

    def post(round_id: int, start: TensorMap = weights, signer: bytes = key) -> httpx.Response:
        body = encode_request(TrainRequest(round_id=round_id, global_weights=start), JSON)
        headers = signed(client, url, signer, "node-1", round_id, body, {"content-type": JSON})
        return client.post(f"{url}/train", content=body, headers=headers)

    def train(round_id: int) -> float:
        answer = post(round_id)
        assert answer.status_code == 200, answer.text
        return float(answer.json()["loss"])

    with serve_in_thread(app) as address, httpx.Client(timeout=REQUEST_TIMEOUT) as client:
        url = f"http://{address}"
        first, second, retried = train(1), train(2), train(2)
        failed = [post(2, huge), post(3, huge)]  # the loss is NaN: the trainer's state stays
        refused = post(3, signer=b"x" * 32)
        third = train(3)
        new_run = train(1)

    assert [first, second, third] == expected  # the AdamW state carries over, failures aside
    assert retried == second  # a retry is redone from the state before the round
    assert new_run == first  # an older round: a new run, from a fresh trainer
    for answer in failed:
        assert answer.status_code == 500
        assert "non-finite loss nan" in answer.json()["detail"], answer.text
    assert refused.status_code == 401
    assert refused.json()["detail"].startswith("bad request signature")
