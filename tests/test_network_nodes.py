"""Real node processes on 127.0.0.1 and the coordinator: runs, failures, attacks and TLS.

Every node is an ``aumai-fedtrain node`` child process on a free loopback port (or, for the
misbehaving ones, a uvicorn server in a thread of this process); every request and every
command has a timeout, and every process and server is stopped in a ``finally``.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    SimulationTrainer,
    TrainRequest,
    create_app,
    verify_update,
)
from aumai_fedtrain.network.auth import NONCE_HEADER, SIGNATURE_HEADER
from aumai_fedtrain.network.server import listen
from aumai_fedtrain.network.wire import decode_update, encode_request, encode_update
from aumai_fedtrain.simulation import SimulationProvider, initial_model
from tests.test_examples import run_cli, run_example

REQUEST_TIMEOUT = 30.0
COMMAND_TIMEOUT = 120.0
SAMPLES_PER_ROUND = TrainingConfig().local_steps * TrainingConfig().batch_size
LOGGER = "aumai_fedtrain.network"


def write_secret(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_text(secrets.token_hex(32) + "\n")
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
    nodes = [FederatedNode(node_id=f"sim-{i}") for i in range(num_nodes)]
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
    auth = {"authorization": f"Bearer {deployment.token.decode()}"}
    json_type = {"content-type": JSON, **auth}
    weights = initial_model(TrainingConfig())
    binary = encode_request(TrainRequest(round_id=1, global_weights=weights), SAFETENSORS)
    cases: list[tuple[dict[str, str], bytes, int, str]] = [
        ({"content-type": JSON}, b"{}", 401, "a bearer token is required"),
        ({"content-type": JSON, "authorization": "Basic abc"}, b"{}", 401, "bearer token"),
        ({"content-type": JSON, "authorization": "Bearer " + "0" * 64}, b"{}", 403, "wrong token"),
        ({"content-type": "text/plain", **auth}, b"{}", 415, "unsupported content type"),
        (auth, b"{}", 415, "unsupported content type"),
        (json_type, b'{"round_id": 1, "global_weights": {', 400, "Invalid JSON"),
        (json_type, b'{"round_id": 1, "weights": {}}', 400, "unknown key 'weights'"),
        ({"content-type": SAFETENSORS, **auth}, b"\x00" * 64, 400, "malformed safetensors"),
        ({"content-type": SAFETENSORS, **auth}, binary[:-8], 400, "malformed safetensors"),
        ({**json_type, NONCE_HEADER: "not hex"}, b'{"round_id": 1}', 400, "hex"),
        (json_type, b" " * (1024 * 1024 + 1), 413, "exceeds the limit of 1048576 bytes"),
        ({"content-type": SAFETENSORS, **auth}, binary + b"\0" * 2**20, 413, "exceeds the limit"),
        (
            json_type,
            b'{"round_id": 1, "global_weights": {"w": [1.0, 2.0]}}',
            422,
            "do not match the built-in model",
        ),
        (
            json_type,
            json.dumps({"round_id": 1, "global_weights": {"layer1.bias": [float("nan")]}}).encode(),
            422,
            "non-finite",
        ),
    ]
    with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
        for headers, body, status, needle in cases:
            response = client.post(url, content=body, headers=headers)
            assert (response.status_code, needle in response.json()["detail"]) == (status, True), (
                headers,
                response.text,
            )
        assert client.get(url).status_code == 405
        before = client.get(f"{node.url}/health").json()["rounds_trained"]
        nonce = "ab" * 16
        good = client.post(
            url,
            content=binary,
            headers={
                "content-type": SAFETENSORS,
                "accept": SAFETENSORS,
                NONCE_HEADER: nonce,
                **auth,
            },
        )
        health = client.get(f"{node.url}/health").json()

    assert good.status_code == 200 and good.headers["content-type"] == SAFETENSORS
    update = decode_update(good.content, good.headers["content-type"])
    assert (update.node_id, update.round_id, update.samples_used) == (
        "node-0",
        1,
        SAMPLES_PER_ROUND,
    )
    assert verify_update(deployment.keys()["node-0"], update, good.headers[SIGNATURE_HEADER], nonce)
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
    first (authentic) answer.
    """

    def __init__(self, inner: Starlette, mode: str) -> None:
        self.inner = inner
        self.mode = mode
        self.first: tuple[bytes, dict[str, str]] | None = None
        self.app = Starlette(routes=[Route("/train", self.train, methods=["POST"])])

    async def train(self, request: Request) -> Response:
        forwarded = {
            name: value
            for name, value in request.headers.items()
            if name in ("content-type", "accept", "authorization", NONCE_HEADER.lower())
        }
        transport = httpx.ASGITransport(app=self.inner)
        async with httpx.AsyncClient(transport=transport, base_url="http://inner") as client:
            answer = await client.post("/train", content=await request.body(), headers=forwarded)
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
        shard = int(node_id.split("-")[1])
        trainer = trainer or SimulationTrainer(shard, config)
        return create_app(NodeSettings(node_id=node_id, key=key, trainer=trainer, config=config))

    rogues = {
        "node-3": Rogue(node_app("node-3", rogue_keys["node-3"]), "tamper").app,
        "node-4": node_app("node-4", secrets.token_hex(32).encode()),  # not the key we know
        "node-5": Rogue(node_app("node-5", rogue_keys["node-5"]), "replay").app,
        "node-6": Rogue(node_app("node-6", rogue_keys["node-6"]), "unsigned").app,
        "node-7": node_app("node-0", rogue_keys["node-7"]),  # claims to be node-0
        "node-8": node_app("node-8", rogue_keys["node-8"], wrong_model_trainer),
        "node-9": node_app("node-9", rogue_keys["node-9"], failing_trainer),
    }
    caplog.set_level(logging.WARNING, logger=LOGGER)
    app = Starlette(routes=[Mount(f"/{node_id}", app=a) for node_id, a in rogues.items()])
    with serve_in_thread(app) as address:
        nodes = federated(cluster) + [
            FederatedNode(node_id=node_id, address=f"{address}/{node_id}") for node_id in rogues
        ]
        provider = HttpUpdateProvider(
            {**keys, **rogue_keys}, token=deployment.token, min_nodes=3, timeout=REQUEST_TIMEOUT
        )
        result = DiLoCoCoordinator().run_training(
            TrainingConfig(num_nodes=len(nodes), global_rounds=3), nodes, provider
        )

    assert result.rounds_completed == 3
    assert result.credits == {
        **{f"node-{i}": 3 * SAMPLES_PER_ROUND for i in range(3)},
        "node-5": SAMPLES_PER_ROUND,  # its first, authentic answer counted
    }
    expected = {
        "node-3": "bad signature: tampered with, or signed with another key",
        "node-4": "bad signature: tampered with, or signed with another key",
        "node-5": "replayed or stale update for round 1, expected round ROUND",
        "node-6": "unsigned update (no X-Fedtrain-Signature header)",
        "node-7": "the answer is an update of node 'node-0'",
        "node-8": "keys ['w'] do not match the model's ['layer1.bias', ",
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
    app = create_app(NodeSettings(node_id="node-3", key=key, trainer=stuck))
    with serve_in_thread(app) as address:
        try:
            nodes = [*federated(cluster), FederatedNode(node_id="node-3", address=address)]
            provider = HttpUpdateProvider(
                {**deployment.keys(), "node-3": key}, token=deployment.token, min_nodes=3, timeout=1
            )
            result = DiLoCoCoordinator().run_training(
                TrainingConfig(num_nodes=4, global_rounds=2), nodes, provider
            )
        finally:
            release.set()

    assert result.rounds_completed == 2
    assert result.credits == {f"node-{i}": 2 * SAMPLES_PER_ROUND for i in range(3)}
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
            timeout=REQUEST_TIMEOUT,
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
    *warnings, error = failed.stderr.strip().splitlines()
    assert warnings == [
        f"WARNING: round 3: no update from node-1: cannot reach {nodes[1].url}/train: "
        "[Errno 111] Connection refused"
    ]
    assert error.startswith(
        "Error: QuorumError: round 3: 1 of 2 nodes sent a valid update, the quorum is 2 "
        "(node-1: cannot reach http://127.0.0.1:"
    )
    assert after_failure == saved
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["rounds_completed"] == 4
    assert summary["credits"] == {"node-0": 4 * SAMPLES_PER_ROUND, "node-1": 4 * SAMPLES_PER_ROUND}
    assert_same_history(summary, simulate(rounds=4, num_nodes=2))


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
        (["run", "--min-nodes", "2"], "--min-nodes needs --nodes-file"),
        (["run", "--nodes-file", str(nodes_file), "--nodes", "2"], "--nodes cannot go with"),
        (["run", "--nodes-file", str(bad_file)], "0.address: Field required"),
        (["run", "--nodes-file", str(nodes_file), "--min-nodes", "2"], "--min-nodes 2 exceeds"),
        (["run", "--nodes-file", str(nodes_file), "--ca-file", str(nodes_file)], "CA file"),
        (["run", "--nodes-file", str(nodes_file), "--timeout", "0"], "--timeout"),
    ]
    for args, needle in cases:
        code, err = run_main(capsys, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and needle in lines[0], (args, err)


def post_in_process(trainer: Callable[..., Any], body: dict[str, Any]) -> httpx.Response:
    """POST ``body`` to a node app with ``trainer``, in this process (no server)."""
    app = create_app(NodeSettings(node_id="n", key=b"k" * 32, trainer=trainer))

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
            return await client.post("/train", json=body, timeout=REQUEST_TIMEOUT)

    return asyncio.run(post())


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
