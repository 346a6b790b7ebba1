"""The node-trainer interface: one trainer per node id, in process, from the CLI, on resume."""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from aumai_fedtrain import DiLoCoCoordinator, FederatedNode, TrainingConfig
from aumai_fedtrain.checkpoint import load_checkpoint
from aumai_fedtrain.models import TensorMap
from aumai_fedtrain.providers import InProcessProvider
from aumai_fedtrain.simulation import SimulationProvider, SimulationTrainer, simulated_nodes
from aumai_fedtrain.trainer import NodeTrainer, TrainerResultError, as_update
from tests.helpers import run_cli

V1_FIXTURE = Path(__file__).parent / "data" / "checkpoint-v1.safetensors"


def fingerprint(node_id: str) -> float:
    return float(int.from_bytes(hashlib.sha256(node_id.encode()).digest()[:4], "big"))


class PullTrainer:
    """Pulls ``theta`` towards a target of its own with momentum kept across rounds.

    Its state carries the fingerprint of its node id, so a state handed to another node is
    caught at once.
    """

    def __init__(self, node_id: str, config: TrainingConfig) -> None:
        self.node_id = node_id
        self.target = fingerprint(node_id) % 7.0
        self.velocity = np.zeros(2)
        self.rounds = 0

    def train(self, round_id: int, parameters: TensorMap) -> tuple[TensorMap, float, int]:
        theta = parameters["theta"]
        self.velocity = 0.5 * self.velocity + (theta - self.target)
        self.rounds += 1
        return {"theta": 0.1 * self.velocity}, float(np.sum((theta - self.target) ** 2)), 8

    def state_dict(self) -> TensorMap:
        return {
            "velocity": self.velocity,
            "rounds": np.array([float(self.rounds)]),
            "owner": np.array([fingerprint(self.node_id)]),
        }

    def load_state_dict(self, state: TensorMap) -> None:
        assert state["owner"][0] == fingerprint(self.node_id), "another node's state"
        self.velocity = state["velocity"].copy()
        self.rounds = int(state["rounds"][0])


def zeros(config: TrainingConfig) -> TensorMap:
    return {"theta": np.zeros(2)}


CONFIG = TrainingConfig(
    model_name="pull", batch_size=4, local_steps=2, global_rounds=3, num_nodes=3
)


def pull_nodes(*ids: str) -> list[FederatedNode]:
    return [FederatedNode(node_id=node_id) for node_id in ids]


def test_the_trainers_are_made_once_per_node_id_and_keep_their_state() -> None:
    provider = InProcessProvider(PullTrainer, model_init=zeros)

    result = DiLoCoCoordinator().run_training(CONFIG, pull_nodes("x", "y", "z"), provider)

    assert result.rounds_completed == 3
    state = provider.state_dict()
    assert sorted({name.split("/")[1] for name in state}) == ["x", "y", "z"]
    assert all(state[f"node/{node}/rounds"][0] == 3.0 for node in "xyz")
    assert isinstance(provider.trainer("x"), NodeTrainer)


def test_stateless_nodes_get_a_fresh_trainer_every_round() -> None:
    provider = InProcessProvider(PullTrainer, model_init=zeros, keep_state=False)

    DiLoCoCoordinator().run_training(CONFIG, pull_nodes("x", "y", "z"), provider)

    assert provider.state_dict() == {}
    assert provider.trainer("x").state_dict()["rounds"][0] == 0.0


def test_a_node_removed_on_resume_hands_its_state_to_no_one(tmp_path: Path) -> None:
    # Prepare: two rounds of x, y, z; the uninterrupted third round of x and z as reference
    two_rounds = CONFIG.model_copy(update={"global_rounds": 2})
    reference = InProcessProvider(PullTrainer, model_init=zeros)
    coordinator = DiLoCoCoordinator()
    after_two = coordinator.run_training(
        two_rounds, pull_nodes("x", "y", "z"), reference, checkpoint_dir=tmp_path
    ).final_state
    expected_updates = reference.get_updates(3, after_two, pull_nodes("x", "z"))
    expected = DiLoCoCoordinator()
    expected.initialize(CONFIG.model_copy(update={"num_nodes": 2}), pull_nodes("x", "z"))
    expected_state = expected.run_round(after_two, expected_updates)

    # Execute: resume without y (the node between the other two)
    resumed = DiLoCoCoordinator().run_training(
        CONFIG.model_copy(update={"num_nodes": 2}),
        pull_nodes("x", "z"),
        InProcessProvider(PullTrainer, model_init=zeros),
        checkpoint_dir=tmp_path,
        resume=True,
    )

    # Assert: x and z went on from their own states; y keeps its credits and its state (were it
    # to come back, it would go on from there)
    assert resumed.final_state.parameters is not None and expected_state.parameters is not None
    assert (
        resumed.final_state.parameters["theta"].tobytes()
        == expected_state.parameters["theta"].tobytes()
    )
    assert resumed.credits == {"x": 24, "y": 16, "z": 24}
    saved = load_checkpoint(tmp_path)
    assert saved is not None and saved.node_ids == ["x", "z"]
    assert saved.provider_state["node/y/rounds"][0] == 2.0


def test_a_node_added_on_resume_starts_from_the_global_model(tmp_path: Path) -> None:
    two_rounds = CONFIG.model_copy(update={"global_rounds": 2, "num_nodes": 2})
    DiLoCoCoordinator().run_training(
        two_rounds, pull_nodes("x", "y"), InProcessProvider(PullTrainer, model_init=zeros),
        checkpoint_dir=tmp_path,
    )  # fmt: skip
    provider = InProcessProvider(PullTrainer, model_init=zeros)

    result = DiLoCoCoordinator().run_training(
        CONFIG, pull_nodes("x", "y", "w"), provider, checkpoint_dir=tmp_path, resume=True
    )

    assert result.credits == {"x": 24, "y": 24, "w": 8}
    assert provider.trainer("w").state_dict()["rounds"][0] == 1.0


def test_the_simulation_s_shards_follow_the_node_id_not_its_position() -> None:
    config = TrainingConfig(num_nodes=2)
    parameters = SimulationProvider().initial_parameters(config)
    alone = SimulationTrainer("node-001", config).train(1, parameters)
    provider = SimulationProvider()
    provider.configure(config)

    from aumai_fedtrain import GlobalState

    updates = provider.get_updates(1, GlobalState(parameters=parameters), simulated_nodes(2)[1:])

    assert updates[0].node_id == "node-001" and updates[0].loss == alone[1]
    assert updates[0].gradients["layer1.weight"].tobytes() == alone[0]["layer1.weight"].tobytes()


def test_a_version_1_checkpoint_resumes_with_each_node_s_inner_state(tmp_path: Path) -> None:
    from aumai_fedtrain.models import SimulationConfig

    (tmp_path / "checkpoint.safetensors").write_bytes(V1_FIXTURE.read_bytes())
    sim = SimulationConfig(
        num_features=4, num_classes=3, hidden_units=8, samples_per_node=16, eval_samples=20
    )
    config = TrainingConfig(
        model_name="v1-fixture", learning_rate=0.01, global_rounds=4, num_nodes=2, local_steps=2,
        batch_size=4, seed=7, simulation=sim,
    )  # fmt: skip
    provider = SimulationProvider()

    result = DiLoCoCoordinator().run_training(
        config, simulated_nodes(2), provider, checkpoint_dir=tmp_path, resume=True
    )

    assert result.rounds_completed == 4
    assert result.credits == {"node-000": 32, "node-001": 32}
    for node in ("node-000", "node-001"):  # 4 rounds of 2 AdamW steps, 2 of them before v0.2
        assert provider.trainer(node).state_dict()["steps"][0] == 8.0


def test_as_update_names_what_a_trainer_got_wrong() -> None:
    with pytest.raises(TrainerResultError, match="non-finite loss inf"):
        as_update(({"w": [1.0]}, float("inf"), 1), "n", 1)
    with pytest.raises(TrainerResultError, match="expected \\(pseudo_gradient, loss"):
        as_update(({"w": [1.0]}, 1.0), "n", 1)
    with pytest.raises(TrainerResultError, match="gradient 'w': holds a string"):
        as_update(({"w": "x"}, 1.0, 1), "n", 1)


def test_a_trainer_that_raises_ends_the_round_naming_the_node() -> None:
    class Broken(PullTrainer):
        def train(self, round_id: int, parameters: TensorMap) -> tuple[TensorMap, float, int]:
            raise MemoryError("out of memory")

    with pytest.raises(
        RuntimeError, match="the trainer of node 'x' failed in round 1: MemoryError"
    ):
        DiLoCoCoordinator().run_training(
            CONFIG.model_copy(update={"num_nodes": 1}), pull_nodes("x"),
            InProcessProvider(Broken, model_init=zeros),
        )  # fmt: skip


PLUGIN = """
import numpy as np


class Trainer:
    def __init__(self, node_id, config):
        self.target = 1.0 if node_id.endswith("0") else 3.0

    def train(self, round_id, parameters):
        theta = parameters["theta"]
        return {"theta": 0.5 * (theta - self.target)}, float(np.sum((theta - self.target) ** 2)), 4

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def init(config):
    return {"theta": np.zeros(2)}


def evaluate(parameters, config):
    return float(np.sum((parameters["theta"] - 2.0) ** 2)), 1.0
"""


def test_run_trains_your_trainer_model_and_evaluator_from_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "my_model.py").write_text(textwrap.dedent(PLUGIN))
    config = tmp_path / "config.json"
    config.write_text(
        TrainingConfig(batch_size=2, local_steps=2, outer_momentum=0.0).model_dump_json()
    )

    completed = run_cli(
        "run", "--config", str(config), "--trainer", "my_model:Trainer", "--model-init",
        "my_model:init", "--evaluator", "my_model:evaluate", "--nodes", "2", "--rounds", "20",
        "--json", cwd=tmp_path,
    )  # fmt: skip

    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout)
    assert summary["credits"] == {"node-000": 80, "node-001": 80}
    assert summary["history"][0]["eval_loss"] > 1.0 > 1e-3 > summary["eval_loss"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--trainer", "no_such_module:f"], "--trainer: cannot import 'no_such_module'"),
        (["--trainer", "json:no_such_function"], "--trainer: 'json' has no function"),
        (["--trainer", "t:f", "--model-init", "json"], "--model-init must look like module:"),
        (
            ["--trainer", "json:loads", "--model-init", "json:loads", "--evaluator", "json:nope"],
            "--evaluator: 'json' has no",
        ),
        (["--trainer", "json:loads", "--evaluator", "json:loads"], "--evaluator needs a global"),
        (["--model-init", "json:loads"], "--model-init needs --trainer or --nodes-file"),
        (["--evaluator", "json:loads"], "--evaluator needs --trainer or --nodes-file"),
    ],
)
def test_bad_plugins_are_one_line_errors(args: list[str], needle: str) -> None:
    completed = run_cli("run", *args)

    lines = completed.stderr.strip().splitlines()
    assert completed.returncode == 2 and len(lines) == 1 and needle in lines[0], completed.stderr
    assert completed.stdout == ""


class StateOf(PullTrainer):
    """A trainer whose state_dict returns ``state``."""

    state: object = None

    def state_dict(self) -> TensorMap:
        return self.state  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("state", "needle"),
    [
        (None, "state_dict() returned NoneType, expected a mapping name -> array"),
        ({"steps": "three"}, "state_dict()['steps'] holds a string, not numbers"),
        ({"": np.zeros(1)}, "state_dict() has a name that is not a non-empty string"),
    ],
)
def test_a_trainer_state_that_cannot_be_checkpointed_is_named(state: object, needle: str) -> None:
    class Bad(StateOf):
        pass

    Bad.state = state
    provider = InProcessProvider(Bad, model_init=zeros)
    DiLoCoCoordinator().run_training(
        CONFIG.model_copy(update={"num_nodes": 1}), pull_nodes("x"), provider
    )

    with pytest.raises(TypeError, match=rf"the trainer of node 'x': {re.escape(needle)}"):
        provider.state_dict()


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ({"theta": np.array([np.inf, 0.0])}, "parameter 'theta' has non-finite values"),
        ({"theta": "abc"}, "parameter 'theta' holds a string, not numbers"),
        ([1.0], "must be a mapping name -> array, got list"),
    ],
)
def test_a_bad_initial_model_is_named(model: object, needle: str) -> None:
    provider = InProcessProvider(PullTrainer, model_init=lambda config: model)  # type: ignore[arg-type,return-value]

    with pytest.raises(ValueError, match=re.escape(needle)):
        DiLoCoCoordinator().run_training(
            CONFIG.model_copy(update={"num_nodes": 1}), pull_nodes("x"), provider
        )


@pytest.mark.parametrize(
    ("evaluate", "needle"),
    [
        (lambda p: 1.0 / 0.0, "round 1: the evaluator failed: ZeroDivisionError"),
        (lambda p: (1.0,), "round 1: the evaluator returned (1.0,), expected (loss, accuracy)"),
        (lambda p: (float("nan"), 0.5), "eval loss is nan"),
    ],
)
def test_a_failing_evaluator_is_named(evaluate: object, needle: str) -> None:
    provider = InProcessProvider(PullTrainer, model_init=zeros, evaluator=evaluate)  # type: ignore[arg-type]

    with pytest.raises(RuntimeError, match=re.escape(needle)):
        DiLoCoCoordinator().run_training(
            CONFIG.model_copy(update={"num_nodes": 1}), pull_nodes("x"), provider
        )


def test_a_failing_trainer_factory_is_named() -> None:
    def factory(node_id: str, config: TrainingConfig) -> PullTrainer:
        raise OSError("no data for this node")

    with pytest.raises(RuntimeError, match="the trainer factory failed for node 'x': OSError"):
        DiLoCoCoordinator().run_training(
            CONFIG.model_copy(update={"num_nodes": 1}), pull_nodes("x"),
            InProcessProvider(factory, model_init=zeros),
        )  # fmt: skip


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ("nan parameters", "its parameters hold non-finite values"),
        ("other shapes", "its momentum do not have the keys and shapes of this run's model"),
        ("short history", "its history does not list rounds 1 to 2"),
        ("twice a node", "it lists a node twice"),
    ],
)
def test_a_checkpoint_with_a_valid_digest_but_unusable_contents_is_refused(
    tmp_path: Path, damage: str, needle: str
) -> None:
    # Prepare: someone who can write the directory saves a checkpoint (its digest is valid)
    from aumai_fedtrain.checkpoint import CheckpointError, save_checkpoint

    two_rounds = CONFIG.model_copy(update={"global_rounds": 2, "num_nodes": 2})
    DiLoCoCoordinator().run_training(
        two_rounds, pull_nodes("x", "y"), InProcessProvider(PullTrainer, model_init=zeros),
        checkpoint_dir=tmp_path,
    )  # fmt: skip
    saved = load_checkpoint(tmp_path)
    assert saved is not None and saved.state.parameters is not None
    if damage == "nan parameters":
        saved.state.parameters["theta"][0] = np.nan
    elif damage == "other shapes":
        saved.state.momentum = {"theta": np.zeros(5)}
    elif damage == "short history":
        saved.history = saved.history[:1]
    else:
        saved.node_ids = ["x", "x"]
    save_checkpoint(tmp_path, saved)

    # Execute / Assert
    with pytest.raises(CheckpointError, match=re.escape(needle)):
        DiLoCoCoordinator().run_training(
            CONFIG.model_copy(update={"num_nodes": 2}), pull_nodes("x", "y"),
            InProcessProvider(PullTrainer, model_init=zeros), checkpoint_dir=tmp_path, resume=True,
        )  # fmt: skip
