"""Compressed updates over HTTP: real node processes on 127.0.0.1 answer with their update
compressed by the run's codec, signed over the bytes sent; the coordinator bounds, verifies and
decodes them, and refuses hostile bodies with reasons naming the node.

Every request and command has a timeout; every process and server is stopped in a ``finally``
(the helpers of :mod:`tests.test_network_nodes`).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import httpx
import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from aumai_fedtrain import DiLoCoCoordinator, FederatedNode, LocalUpdate, TrainingConfig
from aumai_fedtrain.compression import Codec, Encoded, ErrorFeedback, decode, encode
from aumai_fedtrain.models import CompressionCodec, CompressionConfig, TensorMap, TrainingResult
from aumai_fedtrain.network import (
    JSON,
    SAFETENSORS,
    HttpUpdateProvider,
    LocalNode,
    NodeSettings,
    QuorumError,
    TrainRequest,
    create_app,
)
from aumai_fedtrain.network.auth import (
    NONCE_HEADER,
    ROUND_HEADER,
    SIGNATURE_HEADER,
    new_nonce,
    sign_body,
    sign_update,
)
from aumai_fedtrain.network.compressed import (
    MAX_COMPRESSED_HEADER_BYTES,
    compressed_limit,
    decode_compressed,
    encode_compressed,
    read_compressed,
)
from aumai_fedtrain.network.node_state import load_node_state
from aumai_fedtrain.network.wire import (
    decode_request,
    encode_request,
    encode_update,
    expected_tensors,
    request_body_bytes,
)
from aumai_fedtrain.simulation import (
    SimulationProvider,
    SimulationTrainer,
    initial_model,
    simulated_nodes,
)
from tests.helpers import run_cli
from tests.test_encoded_stream import spy_on_folds
from tests.test_network_nodes import (
    REQUEST_TIMEOUT,
    Deployment,
    federated,
    running,
    serve_in_thread,
)
from tests.test_observability import metric_values
from tests.test_observability_network import scrape

ROUNDS = 3
SENT = ("fedtrain_node_sent_bytes_total", ())


def compressed_config(
    codec: CompressionCodec, error_feedback: bool = True, rounds: int = ROUNDS
) -> TrainingConfig:
    compression = CompressionConfig(codec=codec, error_feedback=error_feedback)
    return TrainingConfig(num_nodes=3, global_rounds=rounds, compression=compression)


def in_process(config: TrainingConfig) -> TrainingResult:
    """The same run with simulated nodes (shards 0-2, as the nodes' --shard) in one process."""
    return DiLoCoCoordinator().run_training(config, simulated_nodes(3), SimulationProvider())


Cluster = tuple[Deployment, list[LocalNode]]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three honest node processes (shards 0-2) that need the coordinator's token, and their
    key and token files."""
    deployment = Deployment(tmp_path_factory.mktemp("deployment"), count=3)
    with running([deployment.local_node(i) for i in range(3)]) as nodes:
        yield deployment, nodes


def sent_bytes(deployment: Deployment, nodes: list[LocalNode]) -> float:
    """The bytes of every ``POST /train`` answer the nodes have sent, by their own count."""
    return sum(metric_values(scrape(node, deployment.token).text)[SENT] for node in nodes)


@pytest.mark.parametrize(
    ("codec", "error_feedback", "wire"), [("int8", False, "binary"), ("int4", True, "json")]
)
def test_a_compressed_http_run_matches_the_in_process_run_and_counts_the_bodies_received(
    cluster: Cluster,
    codec: CompressionCodec,
    error_feedback: bool,
    wire: Literal["binary", "json"],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deployment, nodes = cluster
    folds = spy_on_folds(monkeypatch)
    config = compressed_config(codec, error_feedback)
    provider = HttpUpdateProvider(
        deployment.keys(),
        token=deployment.token,
        model_init=initial_model,
        timeout=REQUEST_TIMEOUT,
        wire=wire,  # (the requests' format: compressed answers are always safetensors)
    )
    before = sent_bytes(deployment, nodes)

    result = DiLoCoCoordinator().run_training(config, federated(nodes), provider)

    # the answers reach the mean encoded and are dequantised inside its folds
    assert folds and set(folds) == {"fold_encoded"}
    answered = sent_bytes(deployment, nodes) - before
    reference = in_process(config)
    uncompressed = in_process(config.model_copy(update={"compression": CompressionConfig()}))
    assert provider.failures == {round_id: {} for round_id in range(1, ROUNDS + 1)}
    assert result.final_state.parameters is not None
    assert reference.final_state.parameters is not None
    for key, value in reference.final_state.parameters.items():
        assert result.final_state.parameters[key].tobytes() == value.tobytes()
    assert [r.avg_loss for r in result.history] == [r.avg_loss for r in reference.history]
    received = [record.bytes_from_nodes for record in result.history]
    assert sum(r or 0 for r in received) == answered  # the bodies the nodes sent, exactly
    shapes = expected_tensors(initial_model(config))
    for record, plain in zip(result.history, uncompressed.history, strict=True):
        assert record.bytes_from_nodes is not None and plain.bytes_from_nodes is not None
        assert record.bytes_from_nodes * 5 < plain.bytes_from_nodes
        if wire == "binary":  # the global parameters go uncompressed
            asked = request_body_bytes(record.round_id, shapes, config.compression)
            assert record.bytes_to_nodes == 3 * asked


def test_the_cli_runs_real_nodes_with_int8_compression(cluster: Cluster, tmp_path: Path) -> None:
    deployment, nodes = cluster
    nodes_file = deployment.nodes_file(nodes)

    completed = run_cli(
        "run", "--nodes-file", str(nodes_file), "--token-file", str(deployment.token_file),
        "--rounds", "2", "--compression", "int8", "--json", cwd=tmp_path,
    )  # fmt: skip

    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout)
    reference = in_process(compressed_config("int8", rounds=2))
    assert [r["avg_loss"] for r in summary["history"]] == [r.avg_loss for r in reference.history]
    assert [r["eval_loss"] for r in summary["history"]] == [r.eval_loss for r in reference.history]
    values = sum(value.size for value in initial_model(TrainingConfig()).values())
    assert summary["bytes_from_nodes"] < 2 * 3 * values * 8 / 5  # float64 updates: 8 bytes each


def test_a_node_restarted_on_its_state_dir_takes_up_its_residual(tmp_path: Path) -> None:
    deployment = Deployment(tmp_path / "deployment", count=2)
    config = compressed_config("int4").model_copy(update={"num_nodes": 2, "global_rounds": 4})
    checkpoints = tmp_path / "checkpoints"

    def node(index: int, port: int | None = None) -> LocalNode:
        state = ["--state-dir", str(tmp_path / f"state-{index}")]
        return deployment.local_node(index, *state, port=port)

    def train(nodes: list[FederatedNode], rounds: int) -> TrainingResult:
        provider = HttpUpdateProvider(
            deployment.keys(), token=deployment.token, model_init=initial_model,
            timeout=REQUEST_TIMEOUT,
        )  # fmt: skip
        short = config.model_copy(update={"global_rounds": rounds})
        resume = rounds > 2
        return DiLoCoCoordinator().run_training(
            short, nodes, provider, checkpoint_dir=checkpoints, resume=resume
        )

    with running([node(0), node(1)]) as started:
        train(federated(started), rounds=2)
        saved = load_node_state(tmp_path / "state-1", "node-1")
        started[1].kill()
        with running([node(1, port=started[1].port)]):
            result = train(federated(started), rounds=4)

    # the residual after round 2 was on disk; without it rounds 3 and 4 would differ
    assert saved is not None and saved.last_round == 2
    residual = [key for key in saved.after if key.startswith("compression/residual/")]
    assert sorted(residual) == sorted(f"compression/residual/{k}" for k in initial_model(config))
    assert any(np.abs(saved.after[key]).max() > 0 for key in residual)
    reference = DiLoCoCoordinator().run_training(config, simulated_nodes(2), SimulationProvider())
    assert [r.avg_loss for r in result.history] == [r.avg_loss for r in reference.history]
    assert result.final_state.parameters is not None
    assert reference.final_state.parameters is not None
    for key, value in reference.final_state.parameters.items():
        assert result.final_state.parameters[key].tobytes() == value.tobytes()


Forge = Callable[[LocalUpdate, str], tuple[bytes, str, str]]
"""``(honest update, nonce) -> (body, content type, signature)`` of a hostile node."""


def signed_compressed(
    key: bytes, codec: Codec, change: Callable[[dict[str, Encoded]], None] | None = None
) -> Forge:
    """Answers compressed with ``codec`` (changed by ``change``), signed with ``key``."""

    def forge(update: LocalUpdate, nonce: str) -> tuple[bytes, str, str]:
        encoded = {name: encode(value, codec) for name, value in update.gradients.items()}
        if change is not None:
            change(encoded)
        body = encode_compressed(update, encoded)
        return body, SAFETENSORS, sign_body(key, update.node_id, update.round_id, body, nonce)

    return forge


def nan_scales(encoded: dict[str, Encoded]) -> None:
    scales = encoded[min(encoded)].scales
    assert scales is not None
    scales[0] = np.nan


def tampered(key: bytes) -> Forge:
    honest = signed_compressed(key, Codec("int8"))

    def forge(update: LocalUpdate, nonce: str) -> tuple[bytes, str, str]:
        body, fmt, signature = honest(update, nonce)
        flipped = bytearray(body)
        flipped[-100] ^= 1  # one code byte (the codes come last in the body)
        return bytes(flipped), fmt, signature

    return forge


def truncated(key: bytes) -> Forge:
    honest = signed_compressed(key, Codec("int8"))

    def forge(update: LocalUpdate, nonce: str) -> tuple[bytes, str, str]:
        body = honest(update, nonce)[0][:-7]
        return body, SAFETENSORS, sign_body(key, update.node_id, update.round_id, body, nonce)

    return forge


def uncompressed(key: bytes, fmt: str) -> Forge:
    def forge(update: LocalUpdate, nonce: str) -> tuple[bytes, str, str]:
        return encode_update(update, fmt), fmt, sign_update(key, update, nonce)

    return forge


def hostile_node(forge: Forge, model: TensorMap, node_id: str) -> Starlette:
    """A node that answers every round with ``forge`` of an honest-looking update."""

    async def nonce(request: Request) -> Response:
        return JSONResponse({"nonce": new_nonce()})

    async def train(request: Request) -> Response:
        round_id = int(request.headers[ROUND_HEADER])
        gradients = {name: np.full_like(value, 1e-3) for name, value in model.items()}
        update = LocalUpdate(
            node_id=node_id, round_id=round_id, gradients=gradients, loss=1.0, samples_used=10
        )
        body, fmt, signature = forge(update, request.headers.get(NONCE_HEADER, ""))
        return Response(body, media_type=fmt, headers={SIGNATURE_HEADER: signature})

    return Starlette(
        routes=[Route("/nonce", nonce, methods=["GET"]), Route("/train", train, methods=["POST"])]
    )


def test_hostile_compressed_answers_are_refused_with_reasons_and_the_run_goes_on(
    cluster: Cluster,
) -> None:
    deployment, honest = cluster
    config = compressed_config("int8", rounds=2)
    model = initial_model(config)
    keys = {f"node-{i}": secrets.token_hex(32).encode() for i in range(3, 11)}
    forges: dict[str, tuple[Forge, str]] = {
        "node-3": (tampered(keys["node-3"]), "bad signature: tampered with"),
        "node-4": (
            signed_compressed(keys["node-4"], Codec("int4")),
            "update compressed with codec 'int4', block size '128'; this run's codec is 'int8', "
            "block size 128",
        ),
        "node-5": (
            signed_compressed(keys["node-5"], Codec("int8", 64)),
            "update compressed with codec 'int8', block size '64'",
        ),
        "node-6": (truncated(keys["node-6"]), "malformed compressed answer: malformed compressed"),
        "node-7": (
            signed_compressed(keys["node-7"], Codec("int8"), nan_scales),
            "malformed compressed answer: tensor 'layer1.bias' has non-finite or negative scales",
        ),
        "node-8": (uncompressed(keys["node-8"], SAFETENSORS), "answer of "),
        "node-9": (uncompressed(keys["node-9"], JSON), "answer of content type 'application/json'"),
        "node-10": (
            signed_compressed(keys["node-10"], Codec("fp16")),
            "update compressed with codec 'fp16'",
        ),
    }
    apps = {node_id: hostile_node(forge, model, node_id) for node_id, (forge, _) in forges.items()}
    app = Starlette(routes=[Mount(f"/{node_id}", app=a) for node_id, a in apps.items()])
    with serve_in_thread(app) as address:
        nodes = federated(honest) + [
            FederatedNode(node_id=node_id, address=f"{address}/{node_id}") for node_id in apps
        ]
        provider = HttpUpdateProvider(
            {**deployment.keys(), **keys},
            token=deployment.token,
            min_nodes=3,
            timeout=REQUEST_TIMEOUT,
            model_init=initial_model,
        )
        result = DiLoCoCoordinator().run_training(
            config.model_copy(update={"num_nodes": len(nodes)}), nodes, provider
        )

    assert result.rounds_completed == 2
    for round_id in (1, 2):
        failures = provider.failures[round_id]
        assert sorted(failures) == sorted(forges)
        for node_id, (_, reason) in forges.items():
            assert failures[node_id].startswith(reason), (node_id, failures[node_id])
    limit = compressed_limit(model, Codec("int8"))
    assert provider.failures[1]["node-8"].endswith(f"exceeds the limit of {limit} bytes")
    assert result.credits["node-0"] > 0 and result.credits["node-3"] == 0


@pytest.mark.parametrize("fmt", [JSON, SAFETENSORS])
def test_a_train_request_carries_the_runs_compression(fmt: str) -> None:
    weights = initial_model(TrainingConfig())
    compression = CompressionConfig(codec="int4", block_size=64, error_feedback=False)
    asked = TrainRequest(round_id=3, global_weights=weights, compression=compression)

    decoded = decode_request(encode_request(asked, fmt), fmt)
    plain = decode_request(encode_request(TrainRequest(round_id=3), fmt), fmt)

    assert decoded.compression == compression and plain.compression is None
    assert decoded.global_weights.keys() == weights.keys()
    if fmt == JSON:  # the guide's form is unchanged without compression
        assert json.loads(encode_request(TrainRequest(round_id=3), fmt)) == {
            "round_id": 3,
            "global_weights": {},
        }
    else:
        shapes = expected_tensors(weights)
        assert len(encode_request(asked, fmt)) == request_body_bytes(3, shapes, compression)


def test_compression_needs_the_global_model_to_decode_the_nodes_answers() -> None:
    provider = HttpUpdateProvider({"node-0": b"k" * 32})
    config = TrainingConfig(compression=CompressionConfig(codec="int4"))

    with pytest.raises(ValueError, match=r"'int4' needs the global model .*model_init"):
        provider.configure(config)
    HttpUpdateProvider({"node-0": b"k" * 32}, model_init=initial_model).configure(config)


def test_a_retried_round_is_redone_from_the_residual_before_it() -> None:
    config = TrainingConfig(num_nodes=3)
    weights = initial_model(config)
    settings = NodeSettings(
        node_id="node-1",
        key=secrets.token_hex(32).encode(),
        trainer_factory=SimulationTrainer,
        allow_unsigned_requests=True,
    )
    compression = CompressionConfig(codec="int4")

    def train(client: httpx.Client, round_id: int) -> bytes:
        request = TrainRequest(round_id=round_id, global_weights=weights, compression=compression)
        answer = client.post(
            "/train", content=encode_request(request, JSON), headers={"content-type": JSON}
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == SAFETENSORS  # whatever Accept says
        return answer.content

    with (
        serve_in_thread(create_app(settings)) as address,
        httpx.Client(base_url=f"http://{address}", timeout=REQUEST_TIMEOUT) as client,
    ):
        bodies = [train(client, round_id) for round_id in (1, 2, 2, 3)]

    model = Codec("int4")
    first, second, retried, third = (
        decode_compressed(body, weights, read_compressed(body, weights, model)) for body in bodies
    )
    reference = SimulationTrainer("node-1", config)
    feedback = ErrorFeedback(model)
    for round_id, got in zip((1, 2, 3), (first, second, third), strict=True):
        gradients, loss, _ = reference.train(round_id, weights)
        expected = {key: decode(value) for key, value in feedback.encode(gradients).items()}
        assert got.loss == loss
        for key, value in expected.items():
            assert got.gradients[key].tobytes() == value.tobytes()
    # the retry is redone from the trainer state and the residual before round 2
    assert retried.loss == second.loss
    for key, value in second.gradients.items():
        assert retried.gradients[key].tobytes() == value.tobytes()


def test_the_memory_budget_counts_a_compressed_answer_as_its_codes_and_scales(
    cluster: Cluster,
) -> None:
    """An answer reserves its body and the codes and scales read out of it (it is never
    decoded), and keeps its codes and scales held until folded: a budget of two bodies is
    enough (it was not while answers were decoded on arrival), one of the codes and scales
    alone is not."""
    deployment, nodes = cluster
    config = compressed_config("int4", rounds=1)
    model = initial_model(config)
    body_limit = compressed_limit(model, Codec("int4"))
    codes_and_scales = body_limit - MAX_COMPRESSED_HEADER_BYTES

    def provider(budget: int) -> HttpUpdateProvider:
        return HttpUpdateProvider(
            deployment.keys(),
            token=deployment.token,
            model_init=initial_model,
            timeout=REQUEST_TIMEOUT,
            memory_budget=budget,
        )

    enough = provider(2 * body_limit)
    result = DiLoCoCoordinator().run_training(config, federated(nodes), enough)
    assert enough.failures == {1: {}} and result.rounds_completed == 1

    short = provider(codes_and_scales)
    with pytest.raises(QuorumError):
        DiLoCoCoordinator().run_training(config, federated(nodes), short)
    for reason in short.failures[1].values():
        assert reason.startswith("decoding this answer could take ")
        assert reason.endswith(f"more than the memory budget of {codes_and_scales} bytes")
