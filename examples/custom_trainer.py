"""Your own model and data on a node: a ``--trainer`` plug-in for ``aumai-fedtrain node``.

``--trainer custom_trainer:make_trainer`` names a factory of the node-trainer interface
(:mod:`aumai_fedtrain.trainer`): the node calls ``make_trainer(node_id, config)`` once, with its
id and its ``--config``, and then, once per round::

    trainer.train(round_id: int, parameters: dict[str, np.ndarray])
        -> tuple[dict[str, np.ndarray], float, int]

with the global parameters to start from (float64 arrays; empty when the coordinator sends
none, then start from the initial model). It trains locally and returns the pseudo-gradient
``parameters - trained`` per key, the mean training loss of the round and the number of samples
it processed; it raises ``ValueError`` for parameters it cannot use. ``state_dict()`` and
``load_state_dict()`` carry what the trainer keeps across rounds (nothing, for plain SGD; an
inner optimizer's moments, for AdamW). The node signs and sends the update; the private data
never leaves the machine.

Here the model is a linear regression ``y ~ x @ w + b`` (mean squared error) trained with
``config.local_steps`` mini-batch SGD steps of ``config.batch_size`` rows at
``config.learning_rate``, on the ``x``/``y`` arrays of the ``.npz`` file named by
``$FEDTRAIN_DATA``. Serve it with (from this folder, so that ``custom_trainer`` imports)::

    FEDTRAIN_DATA=lab-a.npz aumai-fedtrain node --port 8750 --node-id lab-a \\
        --key-file lab-a.key --config node.json --trainer custom_trainer:make_trainer

The coordinator starts the run from :func:`initial_parameters`
(``HttpUpdateProvider(keys, model_init=initial_parameters)``). Running this file does all of it
on one machine: it makes a regression problem, gives two nodes private, differently distributed
shards, serves them with this trainer and trains ten rounds over HTTP.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from aumai_fedtrain import DiLoCoCoordinator, FederatedNode, RoundRecord, TrainingConfig

NUM_FEATURES = 8
DATA_ENV = "FEDTRAIN_DATA"


def initial_parameters(config: TrainingConfig) -> dict[str, np.ndarray]:
    """The model every run starts from: all zeros."""
    return {"w": np.zeros(NUM_FEATURES), "b": np.zeros(1)}


def load_data() -> tuple[np.ndarray, np.ndarray]:
    """This node's private data: ``x`` (rows, NUM_FEATURES) and ``y`` (rows,)."""
    path = os.environ.get(DATA_ENV)
    if not path:
        raise ValueError(f"set {DATA_ENV} to this node's .npz data file")
    with np.load(path) as data:
        features, targets = data["x"], data["y"]
    if features.ndim != 2 or features.shape[1] != NUM_FEATURES or targets.shape != (len(features),):
        raise ValueError(f"{path}: expected x of shape (n, {NUM_FEATURES}) and y of shape (n,)")
    return features, targets


class RegressionTrainer:
    """Mini-batch SGD on this node's private data (plain SGD keeps no state across rounds)."""

    def __init__(self, node_id: str, config: TrainingConfig) -> None:
        self.node_id = node_id
        self.config = config
        self.features, self.targets = load_data()

    def train(
        self, round_id: int, parameters: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], float, int]:
        """One round of local SGD; returns (pseudo-gradient, mean loss, samples)."""
        config, features, targets = self.config, self.features, self.targets
        start = parameters or initial_parameters(config)
        if {key: value.shape for key, value in start.items()} != {"w": (NUM_FEATURES,), "b": (1,)}:
            raise ValueError(f"expected parameters w ({NUM_FEATURES},) and b (1,)")
        w, b = start["w"].copy(), start["b"].copy()
        rng = np.random.default_rng((config.seed, round_id))
        batch = min(config.batch_size, len(targets))
        losses = []
        for _ in range(config.local_steps):
            rows = rng.choice(len(targets), size=batch, replace=False)
            error = features[rows] @ w + b - targets[rows]
            losses.append(float(np.mean(error**2)))
            w -= config.learning_rate * 2.0 * features[rows].T @ error / len(rows)
            b -= config.learning_rate * 2.0 * np.mean(error)
        return (
            {"w": start["w"] - w, "b": start["b"] - b},
            float(np.mean(losses)),
            batch * config.local_steps,
        )

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state:
            raise ValueError("this trainer keeps no state")


def make_trainer(node_id: str, config: TrainingConfig) -> RegressionTrainer:
    """The factory that ``--trainer custom_trainer:make_trainer`` names."""
    return RegressionTrainer(node_id, config)


def main() -> None:
    from aumai_fedtrain.network import HttpUpdateProvider, LocalNode

    rng = np.random.default_rng(7)
    true_w, true_b = rng.normal(size=NUM_FEATURES), 0.5
    node_config = TrainingConfig(learning_rate=0.05, batch_size=32, local_steps=20)
    # The coordinator's config describes the nodes' training too: it bounds the samples a node
    # may claim in a round (local_steps * batch_size).
    run_config = node_config.model_copy(
        update={"model_name": "linear-regression", "global_rounds": 10, "num_nodes": 2}
    )
    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as folder, ExitStack() as stack:
        config_file = Path(folder) / "node.json"
        config_file.write_text(node_config.model_dump_json())
        keys: dict[str, bytes] = {}
        nodes: list[LocalNode] = []
        for index, node_id in enumerate(["lab-a", "lab-b"]):
            # Each lab sees a differently shifted part of the feature space (non-i.i.d.).
            features = rng.normal(loc=index - 0.5, size=(400, NUM_FEATURES))
            targets = features @ true_w + true_b + rng.normal(scale=0.1, size=400)
            data_file = Path(folder) / f"{node_id}.npz"
            np.savez(data_file, x=features, y=targets)
            key_file = Path(folder) / f"{node_id}.key"
            key_file.write_text(secrets.token_hex(32))
            key_file.chmod(0o600)  # a secret: readable by its owner only
            keys[node_id] = key_file.read_text().encode()
            arguments = ["--config", str(config_file), "--trainer", "custom_trainer:make_trainer"]
            node = LocalNode(node_id, key_file, arguments, cwd=here, env={DATA_ENV: str(data_file)})
            nodes.append(stack.enter_context(node))
        provider = HttpUpdateProvider(keys, model_init=initial_parameters)
        federated = [FederatedNode(node_id=node.node_id, address=node.address) for node in nodes]

        def show(record: RoundRecord) -> None:
            print(f"round {record.round_id:2d}: train MSE {record.avg_loss:.5f}")

        result = DiLoCoCoordinator().run_training(run_config, federated, provider, on_round=show)
    parameters = result.final_state.parameters
    assert parameters is not None
    error = float(np.linalg.norm(parameters["w"] - true_w))
    print(f"|w - w_true| = {error:.4f}, b = {parameters['b'][0]:.4f} (true {true_b})")
    print(f"Credits: {json.dumps(result.credits)}")


if __name__ == "__main__":
    main()
