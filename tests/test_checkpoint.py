"""Checkpoints: atomic per-round files, exact resume, clear errors for bad checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aumai_fedtrain import CheckpointError, DiLoCoCoordinator, TrainingConfig
from aumai_fedtrain.checkpoint import CHECKPOINT_FILE, load_checkpoint
from tests.helpers import QuadraticProvider, quadratic_nodes

CONFIG = TrainingConfig(
    model_name="ckpt", learning_rate=0.3, batch_size=2, local_steps=2, global_rounds=5, num_nodes=2
)


def train(config: TrainingConfig, directory: Path | None, resume: bool = False):
    nodes, targets = quadratic_nodes()
    return DiLoCoCoordinator().run_training(
        config, nodes, QuadraticProvider(targets), checkpoint_dir=directory, resume=resume
    )


def test_checkpoint_holds_the_complete_state_after_every_round(tmp_path: Path) -> None:
    result = train(CONFIG.model_copy(update={"global_rounds": 3}), tmp_path)

    checkpoint = load_checkpoint(tmp_path)

    assert checkpoint is not None
    assert checkpoint.state == result.final_state
    assert checkpoint.credits == result.credits
    assert checkpoint.history == result.history
    assert checkpoint.node_ids == ["a", "b"]
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]  # no temp files left


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path: Path) -> None:
    uninterrupted = train(CONFIG, None)
    train(CONFIG.model_copy(update={"global_rounds": 2}), tmp_path)

    resumed = train(CONFIG, tmp_path, resume=True)

    assert resumed.rounds_completed == 5
    assert resumed.final_state == uninterrupted.final_state
    assert (
        resumed.final_state.parameters["theta"].tobytes()
        == uninterrupted.final_state.parameters["theta"].tobytes()
    )
    assert resumed.credits == uninterrupted.credits
    assert [r.avg_loss for r in resumed.history] == [r.avg_loss for r in uninterrupted.history]


def test_resume_without_a_checkpoint_starts_from_round_zero(tmp_path: Path) -> None:
    result = train(CONFIG, tmp_path / "new", resume=True)

    assert result.rounds_completed == 5


def test_existing_checkpoint_is_not_overwritten_without_resume(tmp_path: Path) -> None:
    train(CONFIG.model_copy(update={"global_rounds": 1}), tmp_path)

    with pytest.raises(CheckpointError, match="already holds a checkpoint of round 1"):
        train(CONFIG, tmp_path)


def test_mismatched_config_is_a_clear_error(tmp_path: Path) -> None:
    train(CONFIG.model_copy(update={"global_rounds": 1}), tmp_path)

    with pytest.raises(CheckpointError, match="differs in: learning_rate"):
        train(CONFIG.model_copy(update={"learning_rate": 0.1}), tmp_path, resume=True)


@pytest.mark.parametrize("damage", ["truncate", "flip-tensor-byte", "garbage"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    train(CONFIG.model_copy(update={"global_rounds": 1}), tmp_path)
    path = tmp_path / CHECKPOINT_FILE
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip-tensor-byte":
        data[-3] ^= 0xFF
    else:
        data = bytearray(b"not a checkpoint at all")
    path.write_bytes(bytes(data))

    with pytest.raises(CheckpointError, match=CHECKPOINT_FILE):
        train(CONFIG, tmp_path, resume=True)


def test_state_without_model_round_trips(tmp_path: Path) -> None:
    from aumai_fedtrain import FederatedNode, LocalUpdate
    from aumai_fedtrain.checkpoint import Checkpoint, save_checkpoint

    coordinator = DiLoCoCoordinator()
    state = coordinator.initialize(CONFIG, [FederatedNode(node_id="a")])
    state = coordinator.run_round(
        state,
        [
            LocalUpdate(
                node_id="a",
                round_id=1,
                gradients={"w": [[1.0, 2.0]], "e": []},
                loss=1.0,
                samples_used=3,
            )
        ],
    )
    save_checkpoint(
        tmp_path,
        Checkpoint(
            config=CONFIG, node_ids=["a"], state=state, credits={"a": 3}, history=[], elapsed=1.5
        ),
    )

    restored = load_checkpoint(tmp_path)

    assert restored is not None and restored.state == state
    assert list(restored.state.global_weights) == ["w", "e"]  # order kept, not sorted
    assert restored.state.parameters is None
    np.testing.assert_array_equal(restored.state.global_weights["w"], [[1.0, 2.0]])


def test_non_object_run_metadata_is_a_clear_error(tmp_path: Path) -> None:
    import json

    from safetensors import safe_open
    from safetensors.numpy import save_file

    train(CONFIG.model_copy(update={"global_rounds": 1}), tmp_path)
    path = tmp_path / CHECKPOINT_FILE
    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    run = json.loads(metadata["run"])
    run["state"] = "not an object"
    save_file(tensors, str(path), metadata={**metadata, "run": json.dumps(run)})

    with pytest.raises(CheckpointError, match="bad run metadata"):
        load_checkpoint(tmp_path)


def test_provider_state_the_provider_cannot_load_is_a_checkpoint_error(tmp_path: Path) -> None:
    from aumai_fedtrain import FederatedNode
    from aumai_fedtrain.models import SimulationConfig
    from aumai_fedtrain.simulation import SimulationProvider

    small = SimulationConfig(
        num_features=4, num_classes=2, hidden_units=4, samples_per_node=16, eval_samples=20
    )
    config = TrainingConfig(
        global_rounds=1, num_nodes=2, local_steps=2, batch_size=4, simulation=small
    )
    nodes = [FederatedNode(node_id=f"n{i}") for i in range(2)]
    DiLoCoCoordinator().run_training(config, nodes, SimulationProvider(), checkpoint_dir=tmp_path)

    with pytest.raises(CheckpointError, match=r"does not fit this provider.*keeps no state"):
        DiLoCoCoordinator().run_training(
            config.model_copy(update={"global_rounds": 2}),
            nodes,
            SimulationProvider(keep_inner_state=False),
            checkpoint_dir=tmp_path,
            resume=True,
        )


def test_a_temporary_file_left_by_a_killed_write_is_cleaned_up(tmp_path: Path) -> None:
    leftover = tmp_path / f".{CHECKPOINT_FILE}.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")

    train(CONFIG.model_copy(update={"global_rounds": 1}), tmp_path)

    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]


def test_resume_keeps_the_users_credit_tracker(tmp_path: Path) -> None:
    from aumai_fedtrain import CreditTracker

    nodes, targets = quadratic_nodes()
    train(CONFIG.model_copy(update={"global_rounds": 2}), tmp_path)
    tracker = CreditTracker()

    coordinator = DiLoCoCoordinator(credit_tracker=tracker)
    result = coordinator.run_training(
        CONFIG, nodes, QuadraticProvider(targets), checkpoint_dir=tmp_path, resume=True
    )

    assert coordinator.credit_tracker is tracker
    assert tracker.all_credits() == result.credits == {"a": 20, "b": 20}
