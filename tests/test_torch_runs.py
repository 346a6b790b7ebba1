"""PyTorch nodes in whole runs: SIGKILL and resume, and HTTP nodes that match in-process ones."""

from __future__ import annotations

import json
from pathlib import Path

from aumai_fedtrain import DiLoCoCoordinator, FederatedNode, TrainingConfig
from aumai_fedtrain.network import HttpUpdateProvider, LocalNode
from aumai_fedtrain.providers import InProcessProvider
from aumai_fedtrain.simulation import simulated_nodes
from tests import torch_models
from tests.test_network_nodes import REQUEST_TIMEOUT, Deployment, running
from tests.test_resume import REPO, reference_and_resumed

CONFIG = TrainingConfig(
    model_name="torch-runs",
    learning_rate=0.01,
    batch_size=16,
    local_steps=5,
    global_rounds=6,
    num_nodes=3,
    seed=4,
)
TORCH_RUN = [
    "--trainer", "tests.torch_models:make_trainer",
    "--model-init", "tests.torch_models:initial_model",
    "--evaluator", "tests.torch_models:evaluate",
]  # fmt: skip


def in_process() -> InProcessProvider:
    return InProcessProvider(torch_models.make_trainer, model_init=torch_models.initial_model)


def test_a_torch_run_killed_with_sigkill_resumes_bit_identically(tmp_path: Path) -> None:
    # Prepare / Execute: an uninterrupted reference run of three torch nodes (inner AdamW
    # state kept), and one killed after round 2 then resumed
    config = CONFIG.model_dump_json()
    expected, actual, reached, resumed = reference_and_resumed(tmp_path, config, TORCH_RUN, 2)

    # Assert: the same global model, nodes' inner state and history, bit for bit
    assert 2 <= reached < CONFIG.global_rounds
    assert actual.state.round_id == CONFIG.global_rounds
    assert expected.state.parameters is not None and actual.state.parameters is not None
    for key, value in expected.state.parameters.items():
        assert actual.state.parameters[key].tobytes() == value.tobytes(), key
    # a float32 model: its checkpointed global copy, momentum and inner state stay float32
    # (the integer BatchNorm counter travels as float64)
    assert actual.state.momentum is not None
    for tensors in (actual.state.parameters, actual.state.momentum, actual.provider_state):
        counters = ("tracked", "batches")
        assert {str(v.dtype) for k, v in tensors.items() if not k.endswith(counters)} == {"float32"}
    assert sorted(actual.provider_state) == sorted(expected.provider_state)
    assert any("/optimizer/" in name for name in actual.provider_state)
    for key, value in expected.provider_state.items():
        assert actual.provider_state[key].tobytes() == value.tobytes(), key
    assert [r.eval_loss for r in actual.history] == [r.eval_loss for r in expected.history]
    assert json.loads(resumed)["credits"] == expected.credits


def test_torch_nodes_over_http_restarted_from_their_state_dirs_match_in_process(
    tmp_path: Path,
) -> None:
    # Prepare: the run in process, and two torch nodes served over HTTP with --state-dir
    config = CONFIG.model_copy(update={"num_nodes": 2, "global_rounds": 4})
    reference = DiLoCoCoordinator().run_training(config, simulated_nodes(2), in_process())
    node_config = tmp_path / "node.json"
    node_config.write_text(config.model_dump_json())
    deployment = Deployment(tmp_path / "deployment", count=2)
    ids = [node.node_id for node in simulated_nodes(2)]
    deployment.key_files = {ids[i]: deployment.key_files[f"node-{i}"] for i in range(2)}

    def node(index: int, port: int | None = None) -> LocalNode:
        args = [
            "--config", str(node_config), "--trainer", "tests.torch_models:make_trainer",
            "--state-dir", str(tmp_path / f"state-{index}"),
        ]  # fmt: skip
        return LocalNode(ids[index], deployment.key_files[ids[index]], args, port=port, cwd=REPO)

    def provider() -> HttpUpdateProvider:
        return HttpUpdateProvider(
            deployment.keys(), model_init=torch_models.initial_model, timeout=REQUEST_TIMEOUT
        )

    # Execute: two rounds, SIGKILL node 1, start it again on its state dir, two more rounds
    checkpoints = tmp_path / "checkpoints"
    with running([node(0), node(1)]) as nodes:
        federated = [FederatedNode(node_id=n.node_id, address=n.address) for n in nodes]
        first = DiLoCoCoordinator().run_training(
            config.model_copy(update={"global_rounds": 2}), federated, provider(),
            checkpoint_dir=checkpoints,
        )  # fmt: skip
        nodes[1].kill()
        with running([node(1, port=nodes[1].port)]):
            resumed = DiLoCoCoordinator().run_training(
                config, federated, provider(), checkpoint_dir=checkpoints, resume=True
            )

    # Assert: bit for bit the in-process run, whose nodes never restarted
    assert [r.avg_loss for r in first.history] == [r.avg_loss for r in reference.history[:2]]
    assert [r.avg_loss for r in resumed.history] == [r.avg_loss for r in reference.history]
    assert resumed.final_state.parameters is not None
    assert reference.final_state.parameters is not None
    for key, value in reference.final_state.parameters.items():
        assert resumed.final_state.parameters[key].tobytes() == value.tobytes(), key
    assert resumed.credits == reference.credits
