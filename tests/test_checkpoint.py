"""Checkpoints: atomic per-round files, exact resume, clear errors for bad checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from aumai_fedtrain import (
    CheckpointError,
    DiLoCoCoordinator,
    FederatedNode,
    GlobalState,
    TrainingConfig,
)
from aumai_fedtrain.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    check_writable,
    checkpoint_lock,
    load_checkpoint,
    save_checkpoint,
)
from aumai_fedtrain.observability import METRICS_FILE
from tests.helpers import QuadraticProvider, quadratic_nodes

V1_FIXTURE = Path(__file__).parent / "data" / "checkpoint-v1.safetensors"
"""A real checkpoint of aumai-fedtrain 0.1 (format version 1), written by the code of commit
c03a40a: the built-in simulation with SimulationConfig(num_features=4, num_classes=3,
hidden_units=8, samples_per_node=16, eval_samples=20) and TrainingConfig(model_name=
"v1-fixture", learning_rate=0.01, global_rounds=2, num_nodes=2, local_steps=2, batch_size=4,
seed=7) on simulated_nodes(2), checkpointed after round 2."""

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
    # no temp files left; the run's metrics file beside the checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE, METRICS_FILE]


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

    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE, METRICS_FILE]


def test_the_digest_written_beside_the_tensors_is_the_one_load_checks(tmp_path: Path) -> None:
    # Prepare: a checkpoint saved twice (the second replaces the first, whose blocks are freed
    # in the background).
    train(CONFIG.model_copy(update={"global_rounds": 1}), tmp_path)
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None
    with checkpoint_lock(tmp_path):
        save_checkpoint(tmp_path, checkpoint)
        save_checkpoint(tmp_path, checkpoint)

    # Execute
    with safe_open(str(tmp_path / CHECKPOINT_FILE), framework="np") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118

    # Assert: the header holds the documented digest of what was written.
    digest = hashlib.sha256(
        json.dumps(["aumai-fedtrain/checkpoint", "2", metadata["run"]]).encode("utf-8")
    )
    for name in sorted(tensors):
        digest.update(json.dumps([name, list(tensors[name].shape)]).encode("utf-8"))
        digest.update(tensors[name].astype("<f8").tobytes())
    assert metadata["sha256"] == digest.hexdigest()
    assert load_checkpoint(tmp_path) == checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE, METRICS_FILE]


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


def rewrite_metadata(path: Path, edit: Callable[[dict[str, str]], None]) -> None:
    """Rewrite the checkpoint file ``path`` with ``edit`` applied to its metadata."""
    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    edit(metadata)
    save_file(tensors, str(path), metadata=metadata)


def edit_run(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, str]], None]:
    """A metadata edit that applies ``change`` to the decoded "run" JSON."""

    def edit(metadata: dict[str, str]) -> None:
        run = json.loads(metadata["run"])
        change(run)
        metadata["run"] = json.dumps(run)

    return edit


def v1_checkpoint(directory: Path) -> Path:
    """A copy of the version 1 fixture as ``directory``'s checkpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(V1_FIXTURE, directory / CHECKPOINT_FILE))


METADATA_CHANGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "credits": lambda run: run["credits"].update(a=999),
    "round_id": lambda run: run["state"].update(round_id=7),
    "avg_loss": lambda run: run["state"].update(avg_loss=0.5),
    "config": lambda run: run["config"].update(learning_rate=0.2),
    "node_ids": lambda run: run["node_ids"].reverse(),
    "history": lambda run: run["history"].pop(),
    "elapsed": lambda run: run.update(elapsed=0.0),
}


@pytest.mark.parametrize("field", sorted(METADATA_CHANGES))
def test_any_change_to_the_metadata_is_corruption(tmp_path: Path, field: str) -> None:
    train(CONFIG.model_copy(update={"global_rounds": 2}), tmp_path)

    rewrite_metadata(tmp_path / CHECKPOINT_FILE, edit_run(METADATA_CHANGES[field]))

    with pytest.raises(CheckpointError, match="is corrupt: its contents do not match"):
        load_checkpoint(tmp_path)


def test_a_checkpoint_relabelled_as_version_1_is_corruption(tmp_path: Path) -> None:
    train(CONFIG.model_copy(update={"global_rounds": 1}), tmp_path)

    rewrite_metadata(tmp_path / CHECKPOINT_FILE, lambda metadata: metadata.update(version="1"))

    with pytest.raises(CheckpointError, match="is corrupt"):
        load_checkpoint(tmp_path)


def test_a_checkpoint_of_an_unknown_version_is_a_one_line_error(tmp_path: Path) -> None:
    train(CONFIG.model_copy(update={"global_rounds": 1}), tmp_path)
    rewrite_metadata(tmp_path / CHECKPOINT_FILE, lambda metadata: metadata.update(version="9"))

    with pytest.raises(CheckpointError, match=r"version '9'; it reads .* versions 1 and 2") as info:
        load_checkpoint(tmp_path)

    assert "\n" not in str(info.value)


BAD_V1_METADATA: dict[str, Callable[[dict[str, str]], None]] = {
    "not-json": lambda metadata: metadata.update(run="{not json"),
    "invalid-credits": edit_run(lambda run: run["credits"].update({"node-000": "lots"})),
    "invalid-config": edit_run(lambda run: run["config"].update(batch_size=-1, seed="x")),
    "state-not-an-object": edit_run(lambda run: run.update(state="not an object")),
    "missing-state": edit_run(lambda run: run.pop("state")),
    "unknown-field": edit_run(lambda run: run.update(surprise=1)),
}


@pytest.mark.parametrize("damage", sorted(BAD_V1_METADATA))
def test_bad_metadata_is_a_one_line_error(tmp_path: Path, damage: str) -> None:
    # Version 1 has no digest over its metadata, so bad metadata reaches validation.
    rewrite_metadata(v1_checkpoint(tmp_path), BAD_V1_METADATA[damage])

    with pytest.raises(CheckpointError, match="is corrupt: bad run metadata") as info:
        load_checkpoint(tmp_path)

    assert "\n" not in str(info.value)


def test_a_version_1_checkpoint_loads_with_its_provider_state_keyed_by_node_id(
    tmp_path: Path,
) -> None:
    with safe_open(str(V1_FIXTURE), framework="np") as handle:
        assert handle.metadata()["version"] == "1"
        raw = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118

    checkpoint = load_checkpoint(v1_checkpoint(tmp_path).parent)

    assert checkpoint is not None
    assert checkpoint.node_ids == ["node-000", "node-001"]
    assert checkpoint.state.round_id == 2 and len(checkpoint.history) == 2
    assert checkpoint.credits == {"node-000": 16, "node-001": 16}
    assert checkpoint.state.parameters is not None
    np.testing.assert_array_equal(
        checkpoint.state.parameters["layer1.weight"], raw["parameters/layer1.weight"]
    )
    assert sorted(checkpoint.provider_state) == sorted(
        f"node/{node}/{tensor}"
        for node in ("node-000", "node-001")
        for tensor in ("steps", "m/packed", "v/packed")
    )
    for position, node in enumerate(checkpoint.node_ids):
        for tensor in ("steps", "m/packed", "v/packed"):
            np.testing.assert_array_equal(
                checkpoint.provider_state[f"node/{node}/{tensor}"],
                raw[f"provider/node/{position}/{tensor}"],
            )


def test_a_version_1_provider_tensor_of_a_missing_node_is_corruption(tmp_path: Path) -> None:
    rewrite_metadata(
        v1_checkpoint(tmp_path), edit_run(lambda run: run.update(node_ids=["node-000"]))
    )

    with pytest.raises(CheckpointError, match="'node/1/steps' names node 1 of 1"):
        load_checkpoint(tmp_path)


def test_new_checkpoints_are_written_as_version_2(tmp_path: Path) -> None:
    train(CONFIG.model_copy(update={"global_rounds": 1}), tmp_path)

    with safe_open(str(tmp_path / CHECKPOINT_FILE), framework="np") as handle:
        metadata = handle.metadata()

    assert metadata["version"] == "2"
    assert set(metadata) == {"format", "version", "run", "sha256"}


def test_membership_and_operational_settings_may_change_on_resume(tmp_path: Path) -> None:
    train(CONFIG.model_copy(update={"global_rounds": 2}), tmp_path)
    targets = {"a": 1.0, "b": 3.0, "c": 5.0}
    changed = CONFIG.model_copy(
        update={"global_rounds": 4, "num_nodes": 3, "max_loss": 50.0, "max_abs_update": 10.0}
    )

    result = DiLoCoCoordinator().run_training(
        changed,
        [FederatedNode(node_id=node_id) for node_id in ("b", "c", "d")],  # "d" sends nothing
        QuadraticProvider(targets),
        checkpoint_dir=tmp_path,
        resume=True,
    )

    assert result.rounds_completed == 4
    assert [record.num_participants for record in result.history] == [2, 2, 2, 2]
    assert result.credits == {"a": 8, "b": 16, "c": 8, "d": 0}


def test_fewer_rounds_than_the_checkpoint_completed_is_a_clear_error(tmp_path: Path) -> None:
    train(CONFIG.model_copy(update={"global_rounds": 3}), tmp_path)

    with pytest.raises(
        CheckpointError,
        match=r"already completed 3 rounds; --rounds 2 is below that: pass --rounds 3 or more",
    ):
        train(CONFIG.model_copy(update={"global_rounds": 2}), tmp_path, resume=True)
    assert train(CONFIG.model_copy(update={"global_rounds": 3}), tmp_path, resume=True).history


def test_a_node_id_with_a_slash_cannot_be_checkpointed() -> None:
    # Per-node provider tensors are named node/<node_id>/...: the data model refuses such ids.
    with pytest.raises(ValueError, match="must not contain '/'"):
        FederatedNode(node_id="site/a")


def test_save_and_load_accept_a_str_directory(tmp_path: Path) -> None:
    coordinator = DiLoCoCoordinator()
    checkpoint = Checkpoint(
        config=CONFIG,
        node_ids=["a"],
        state=coordinator.initialize(CONFIG, [FederatedNode(node_id="a")]),
        credits={"a": 0},
        history=[],
        elapsed=0.25,
    )

    written = save_checkpoint(str(tmp_path / "new"), checkpoint)

    assert written == tmp_path / "new" / CHECKPOINT_FILE
    assert load_checkpoint(str(tmp_path / "new")) == checkpoint


def test_a_checkpoint_file_honours_the_umask(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        train(CONFIG.model_copy(update={"global_rounds": 1}), tmp_path)
    finally:
        os.umask(umask)

    assert stat.S_IMODE((tmp_path / CHECKPOINT_FILE).stat().st_mode) == 0o644


def test_check_writable_creates_the_directory_and_leaves_nothing_in_it(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b"

    check_writable(str(directory))

    assert directory.is_dir() and list(directory.iterdir()) == []


def test_check_writable_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")

    with pytest.raises(CheckpointError, match=r"'.*/file' is not a directory"):
        check_writable(tmp_path / "file")
    with pytest.raises(CheckpointError, match=r"cannot create .*'.*/file/sub': Not a directory"):
        check_writable(tmp_path / "file" / "sub")


def test_loading_from_a_file_instead_of_a_directory_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")

    with pytest.raises(CheckpointError, match=r"cannot read checkpoint '.*/file/.*': Not a direc"):
        load_checkpoint(tmp_path / "file")


def test_check_writable_names_the_os_reason(tmp_path: Path) -> None:
    # /proc/self exists and is a directory nobody (root included) can create files in.
    with pytest.raises(CheckpointError) as info:
        check_writable("/proc/self")

    message = str(info.value)
    assert message.startswith("checkpoint directory '/proc/self' is not writable: ")
    assert "\n" not in message


def test_a_failed_write_is_a_one_line_error_that_keeps_the_previous_checkpoint(
    tmp_path: Path,
) -> None:
    train(CONFIG.model_copy(update={"global_rounds": 1}), tmp_path)
    before = (tmp_path / CHECKPOINT_FILE).read_bytes()
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint is not None
    # A real write error half-way through the file, as on a full disk: a file size limit.
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, limits[1]))
    try:
        with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*: File too large"):
            save_checkpoint(tmp_path, checkpoint)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)

    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE, METRICS_FILE]
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == before


def test_tensors_keep_their_dtype_and_bytes_and_the_digest_covers_it(tmp_path: Path) -> None:
    # Prepare: a float32 model with its float32 outer state, float16 and float64 provider state
    awkward = np.array([0.1, -0.0, 3.4028235e38, 1e-45], dtype=np.float32)
    state = GlobalState(
        round_id=1,
        parameters={"w": awkward, "b": np.float32([2.5])},
        momentum={"w": awkward[::-1].copy(), "b": np.float32([0.0])},
        global_weights={"w": awkward / 2, "b": np.float32([1.0])},
    )
    provider_state = {"node/a/h": np.float16([65504.0, 6e-8]), "node/a/count": np.array([3.0])}
    checkpoint = Checkpoint(
        config=CONFIG, node_ids=["a"], state=state, credits={"a": 1}, history=[], elapsed=0.5,
        provider_state=provider_state,
    )  # fmt: skip

    # Execute
    save_checkpoint(tmp_path, checkpoint)
    restored = load_checkpoint(tmp_path)

    # Assert: the same dtypes and bytes, F32/F16/F64 in the file, and the documented digest
    assert restored is not None and restored.state.parameters is not None
    for group in ("parameters", "momentum", "global_weights"):
        for key, value in getattr(state, group).items():
            held = getattr(restored.state, group)[key]
            assert held.dtype == np.float32 and held.tobytes() == value.tobytes(), (group, key)
    for key, value in provider_state.items():
        assert restored.provider_state[key].dtype == value.dtype
        assert restored.provider_state[key].tobytes() == value.tobytes()
    with safe_open(str(tmp_path / CHECKPOINT_FILE), framework="np") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    names = {"F64": np.float64, "F32": np.float32, "F16": np.float16}
    digest = hashlib.sha256(
        json.dumps(["aumai-fedtrain/checkpoint", "2", metadata["run"]]).encode("utf-8")
    )
    for name in sorted(tensors):
        described: list[Any] = [name, list(tensors[name].shape)]
        dtype = next(label for label, kind in names.items() if tensors[name].dtype == kind)
        if dtype != "F64":
            described.append(dtype)
        digest.update(json.dumps(described).encode("utf-8"))
        digest.update(tensors[name].tobytes())
    assert metadata["sha256"] == digest.hexdigest()
    assert tensors["provider/node/a/h"].dtype == np.float16
    assert tensors["momentum/w"].dtype == np.float32


def test_a_checkpoint_whose_dtype_was_changed_is_corruption(tmp_path: Path) -> None:
    # Prepare: relabel a float32 tensor as float16 of twice the length (same bytes)
    state = GlobalState(round_id=1, global_weights={"w": np.float32([1.0, 2.0])})
    save_checkpoint(
        tmp_path,
        Checkpoint(config=CONFIG, node_ids=["a"], state=state, credits={}, history=[], elapsed=0),
    )
    path = tmp_path / CHECKPOINT_FILE
    body = path.read_bytes()
    length = int.from_bytes(body[:8], "little")
    header = body[8 : 8 + length].replace(
        b'"dtype":"F32","shape":[2]', b'"dtype":"F16","shape":[4]'
    )
    path.write_bytes(body[:8] + header + body[8 + length :])

    # Execute / Assert
    with pytest.raises(CheckpointError, match="is corrupt: its contents do not match"):
        load_checkpoint(tmp_path)


def test_resuming_a_checkpoint_of_another_dtype_is_a_clear_error(tmp_path: Path) -> None:
    # Prepare: a float64 run checkpointed, then resumed by a run whose model is float32
    train(CONFIG.model_copy(update={"global_rounds": 1}), tmp_path)
    nodes, targets = quadratic_nodes()

    class Float32Quadratic(QuadraticProvider):
        def initial_parameters(self, config: TrainingConfig) -> dict[str, np.ndarray]:
            return {"theta": np.zeros(3, dtype=np.float32)}

    # Execute / Assert
    expected = "'theta' are float64, this run's model keeps float32"
    with pytest.raises(CheckpointError, match=expected):
        DiLoCoCoordinator().run_training(
            CONFIG, nodes, Float32Quadratic(targets), checkpoint_dir=tmp_path, resume=True
        )
