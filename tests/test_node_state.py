"""``aumai-fedtrain node --state-dir``: a restarted node takes up its trainer state."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors.numpy import save

from aumai_fedtrain import DiLoCoCoordinator, FederatedNode, TrainingConfig
from aumai_fedtrain.network import HttpUpdateProvider, LocalNode
from aumai_fedtrain.network.node_state import (
    STATE_FILE,
    NodeState,
    NodeStateError,
    load_node_state,
    save_node_state,
)
from aumai_fedtrain.network.server import NodeSettings, create_app
from aumai_fedtrain.simulation import SimulationTrainer, builtin_evaluator, initial_model
from tests.test_network_nodes import (
    REQUEST_TIMEOUT,
    Deployment,
    assert_same_history,
    running,
    simulate,
    write_secret,
)

CONFIG = TrainingConfig(num_nodes=2, global_rounds=4)


def test_a_node_killed_and_restarted_on_its_state_dir_goes_on_exactly(tmp_path: Path) -> None:
    # Prepare: two built-in nodes that keep their state; the same run in one process
    deployment = Deployment(tmp_path / "deployment", count=2)

    def node(index: int, port: int | None = None) -> LocalNode:
        return deployment.local_node(
            index, "--state-dir", str(tmp_path / f"state-{index}"), port=port
        )

    def provider() -> HttpUpdateProvider:
        return HttpUpdateProvider(
            deployment.keys(), token=deployment.token, model_init=initial_model,
            evaluator=builtin_evaluator(CONFIG), timeout=REQUEST_TIMEOUT,
        )  # fmt: skip

    # Execute: two rounds, SIGKILL node 1 and start it again on its directory, two more rounds
    checkpoints = tmp_path / "checkpoints"
    with running([node(0), node(1)]) as nodes:
        federated = [FederatedNode(node_id=n.node_id, address=n.address) for n in nodes]
        DiLoCoCoordinator().run_training(
            CONFIG.model_copy(update={"global_rounds": 2}), federated, provider(),
            checkpoint_dir=checkpoints,
        )  # fmt: skip
        nodes[1].kill()
        with running([node(1, port=nodes[1].port)]) as (restarted,):
            result = DiLoCoCoordinator().run_training(
                CONFIG, federated, provider(), checkpoint_dir=checkpoints, resume=True
            )
            restart_log = restarted.output()

    # Assert: the run of nodes that never restarted, bit for bit (without the state, the
    # restarted node's fresh AdamW would change rounds 3 and 4)
    reference = simulate(rounds=4, num_nodes=2)
    assert_same_history(
        {
            "history": [r.model_dump() for r in result.history],
            "total_samples": result.total_samples,
        },
        reference,
    )
    assert result.final_state.parameters is not None and reference.final_state.parameters
    for key, value in reference.final_state.parameters.items():
        assert result.final_state.parameters[key].tobytes() == value.tobytes(), key
    assert "took up the trainer state after round 2" in restart_log
    saved = load_node_state(tmp_path / "state-1", "node-1")
    assert saved is not None and saved.last_round == 4


def post(app: Any, round_id: int, weights: dict[str, np.ndarray]) -> dict[str, Any]:
    """POST a round to a node app in this process; the update it answers."""
    body = {"round_id": round_id, "global_weights": {k: v.tolist() for k, v in weights.items()}}

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
            return await client.post("/train", json=body, timeout=REQUEST_TIMEOUT)

    answer = asyncio.run(send())
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def test_the_last_round_asked_again_after_a_restart_is_trained_again_from_before(
    tmp_path: Path,
) -> None:
    # Prepare: a node that trained rounds 1 and 2 (the answer to round 2 was lost, say)
    config = TrainingConfig()
    weights = initial_model(config)

    def app() -> Any:
        settings = NodeSettings(
            node_id="node-0", key=b"k" * 32, trainer_factory=SimulationTrainer, config=config,
            state_dir=tmp_path, allow_unsigned_requests=True,  # (about state, not signatures)
        )  # fmt: skip
        return create_app(settings)

    first = app()
    post(first, 1, weights)
    second_round = post(first, 2, weights)
    third_round = post(first, 3, weights)

    # Execute: a restart after round 2 (the saved state of round 2), then round 2 again, and 3
    save_node_state(tmp_path, "node-0", NodeState(2, *states_around_round_two(config, weights)))
    restarted = app()
    again, then = post(restarted, 2, weights), post(restarted, 3, weights)

    # Assert
    assert again == second_round
    assert then == third_round


def states_around_round_two(
    config: TrainingConfig, weights: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    trainer = SimulationTrainer("node-0", config)
    trainer.train(1, weights)
    before = {k: v.copy() for k, v in trainer.state_dict().items()}
    trainer.train(2, weights)
    return before, trainer.state_dict()


def test_a_state_file_keeps_dtypes_and_refuses_another_node(tmp_path: Path) -> None:
    state = NodeState(
        7,
        before={"step": np.array(3.0, dtype=np.float32)},
        after={"m": np.arange(4, dtype=np.float32).reshape(2, 2), "step": np.array(4.0)},
    )

    save_node_state(tmp_path, "a", state)
    loaded = load_node_state(tmp_path, "a")

    assert loaded is not None and loaded.last_round == 7
    assert loaded.before["step"].shape == () and loaded.before["step"].dtype == np.float32
    assert loaded.after["m"].tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert loaded.after["m"].dtype == np.float32
    assert load_node_state(tmp_path / "elsewhere", "a") is None
    with pytest.raises(NodeStateError, match="holds the state of node 'a', not of 'b'"):
        load_node_state(tmp_path, "b")
    (tmp_path / STATE_FILE).write_bytes(save({"x": np.zeros(1)}, {"format": "other"}))
    with pytest.raises(NodeStateError, match="is not a node state"):
        load_node_state(tmp_path, "a")
    (tmp_path / STATE_FILE).write_bytes(b"torn")
    with pytest.raises(NodeStateError, match="is not a readable node state"):
        load_node_state(tmp_path, "a")


def test_a_node_with_a_bad_state_dir_stops_with_one_line(tmp_path: Path) -> None:
    key = write_secret(tmp_path, "node.key")
    save_node_state(tmp_path / "theirs", "node-9", NodeState(1, {}, {}))
    (tmp_path / "a-file").write_text("")
    cases = [
        (tmp_path / "theirs", "--state-dir: ", "holds the state of node 'node-9', not of 'node-1'"),
        (tmp_path / "a-file", "--state-dir", "a-file", "is a file"),
        (tmp_path / "a-file" / "below", "cannot create --state-dir", "Not a directory"),
    ]
    for directory, *needles in cases:
        node = LocalNode("node-1", key, ["--state-dir", str(directory)], startup_timeout=60)
        with pytest.raises(RuntimeError, match="exited with code 2") as failed:
            node.start()
        (line,) = [x for x in str(failed.value).splitlines() if "Error:" in x]
        assert all(needle in line.partition("Error: ")[2] for needle in needles), line
