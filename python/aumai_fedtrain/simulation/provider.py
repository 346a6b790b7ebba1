"""The built-in simulation: :class:`SimulationTrainer` and the provider that runs it in process.

Each virtual node starts a round from the global parameters, takes ``local_steps`` AdamW steps
on mini-batches of its own shard and returns the pseudo-gradient
``theta_global - theta_node``. :class:`SimulationTrainer` implements the node-trainer interface
(:mod:`aumai_fedtrain.trainer`), so the same code trains a virtual node in process and a real
node over HTTP (``aumai-fedtrain node`` without ``--trainer``). Nodes are trained one after the
other, so memory holds one node's model at a time (plus the returned updates).

As in the DiLoCo paper, each node keeps its inner AdamW state across rounds; it is never
communicated, but it is part of the run's checkpoints (:meth:`SimulationProvider.state_dict`),
so a resumed run reproduces an uninterrupted one bit for bit. It costs two model-sized arrays
per node. ``SimulationProvider(keep_inner_state=False)`` makes the nodes stateless instead:
every round starts from a fresh AdamW, which costs no memory per node but trains clearly worse
(see ``docs/experiments.md``).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from aumai_fedtrain.models import FederatedNode, TensorMap, TrainingConfig
from aumai_fedtrain.providers.in_process import InProcessProvider, NodeProgress
from aumai_fedtrain.simulation import mlp
from aumai_fedtrain.simulation.adamw import AdamW
from aumai_fedtrain.simulation.data import SyntheticTask
from aumai_fedtrain.simulation.seeding import Stream, derive_rng
from aumai_fedtrain.trainer import Evaluator

__all__ = [
    "NodeProgress",
    "SimulationProvider",
    "SimulationTrainer",
    "builtin_evaluator",
    "initial_model",
    "new_inner_optimizer",
    "shard_of",
    "simulated_nodes",
    "train_locally",
]

_SIMULATED_ID = re.compile(r"node-(\d+)")


def simulated_nodes(count: int) -> list[FederatedNode]:
    """``count`` virtual nodes named ``node-000``, ``node-001``, ... (the simulation's shards)."""
    width = max(3, len(str(count - 1)))
    return [
        FederatedNode(node_id=f"node-{index:0{width}d}", address=f"sim://{index}")
        for index in range(count)
    ]


def shard_of(node_id: str) -> int:
    """The synthetic task's shard a node trains on, a function of its id alone.

    ``node-<N>`` (the ids of :func:`simulated_nodes`) holds shard ``N``; any other id holds a
    shard numbered by the first 8 bytes of its id's SHA-256, so a node keeps its data whatever
    its position in the node list.
    """
    match = _SIMULATED_ID.fullmatch(node_id)
    if match is not None:
        return int(match.group(1))
    return int.from_bytes(hashlib.sha256(node_id.encode("utf-8")).digest()[:8], "big")


def initial_model(config: TrainingConfig) -> TensorMap:
    """The seeded initial global model of a run."""
    sim = config.simulation
    return mlp.init_parameters(
        sim.num_features, sim.hidden_units, sim.num_classes, derive_rng(config.seed, Stream.INIT)
    )


def builtin_evaluator(config: TrainingConfig) -> Evaluator:
    """Held-out loss and accuracy of the built-in model on the synthetic task's eval set."""
    task = SyntheticTask(config.simulation, config.seed, cache_size=0)
    return lambda parameters: mlp.evaluate(parameters, *task.eval_set())


def new_inner_optimizer(config: TrainingConfig) -> AdamW:
    """A fresh inner AdamW with the run's learning rate and weight decay."""
    return AdamW(config.learning_rate, weight_decay=config.simulation.weight_decay)


def train_locally(
    parameters: TensorMap,
    task: SyntheticTask,
    node: int,
    round_id: int,
    config: TrainingConfig,
    optimizer: AdamW | None = None,
) -> tuple[TensorMap, float]:
    """Train a copy of ``parameters`` on ``node``'s shard for one round.

    ``optimizer`` carries the node's AdamW state over from earlier rounds; without it the round
    starts from a fresh AdamW. Returns the pseudo-gradient ``parameters - trained`` and the
    mean mini-batch loss over the ``config.local_steps`` steps (each measured before its step).
    """
    flat, trained = mlp.pack(parameters)
    flat_grads, grads = mlp.pack(parameters)  # overwritten by every loss_and_grads call
    if optimizer is None:
        optimizer = new_inner_optimizer(config)
    losses = []
    # A diverging node shows as a non-finite loss or update (reported by the caller), not as
    # NumPy warnings.
    with np.errstate(over="ignore", invalid="ignore"):
        for features, labels in task.batches(node, round_id, config.local_steps, config.batch_size):
            losses.append(mlp.loss_and_grads(trained, features, labels, out=grads)[0])
            optimizer.step({"packed": flat}, {"packed": flat_grads})
    delta = {key: parameters[key] - trained[key] for key in parameters}
    return delta, float(np.mean(losses))


class SimulationTrainer:
    """The built-in node trainer: the simulation's MLP on the node's shard of the synthetic task.

    Made by ``SimulationTrainer(node_id, config)`` (a factory of the node-trainer interface).
    The inner AdamW state stays with the trainer across rounds and is its :meth:`state_dict`.

    Parameters
    ----------
    node_id
        The node's id; it chooses the shard (see :func:`shard_of`) unless ``shard`` is given.
    config
        The run's configuration; its ``seed`` and ``simulation`` settings define the task and
        the initial model, which must match the coordinator's.
    task
        The dataset to draw the shard from (shared by the virtual nodes of one process); by
        default one is built from ``config``.
    shard
        Train on this shard instead of the one of ``node_id``.
    """

    def __init__(
        self,
        node_id: str,
        config: TrainingConfig,
        *,
        task: SyntheticTask | None = None,
        shard: int | None = None,
    ) -> None:
        self.node_id = node_id
        self.config = config
        self.shard = shard_of(node_id) if shard is None else shard
        self.task = task if task is not None else SyntheticTask(config.simulation, config.seed)
        sim = config.simulation
        self._shapes = mlp.parameter_shapes(sim.num_features, sim.hidden_units, sim.num_classes)
        self.optimizer = new_inner_optimizer(config)

    def train(self, round_id: int, parameters: TensorMap) -> tuple[TensorMap, float, int]:
        """``local_steps`` AdamW steps from ``parameters`` (the initial model when empty)."""
        start = parameters if parameters else initial_model(self.config)
        shapes = {key: tuple(value.shape) for key, value in start.items()}
        if shapes != self._shapes:
            raise ValueError(
                f"the parameters do not match the built-in model: got shapes {shapes}, "
                f"expected {self._shapes}"
            )
        delta, loss = train_locally(
            start, self.task, self.shard, round_id, self.config, self.optimizer
        )
        return delta, loss, self.config.local_steps * self.config.batch_size

    def state_dict(self) -> TensorMap:
        """The inner AdamW's step count and moments (see :meth:`AdamW.state_dict`)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: TensorMap) -> None:
        """Restore the inner AdamW from :meth:`state_dict`."""
        self.optimizer.load_state_dict(state)


class SimulationProvider(InProcessProvider):
    """Virtual nodes that really train an MLP on shards of the built-in synthetic task.

    Each node trains with a :class:`SimulationTrainer` on the shard of its id (see
    :func:`shard_of`); everything random is a function of ``(config.seed, shard, round)``, so
    the updates are deterministic.

    Parameters
    ----------
    on_node_done
        Optional progress hook, called after each node of a round.
    shard_cache_size
        How many node shards to keep in memory between uses (the rest are regenerated).
    keep_inner_state
        Keep each node's AdamW state across rounds (as in the DiLoCo paper; the default) instead
        of starting every round afresh.
    """

    def __init__(
        self,
        *,
        on_node_done: NodeProgress | None = None,
        shard_cache_size: int = 16,
        keep_inner_state: bool = True,
    ) -> None:
        super().__init__(
            self._make_trainer,
            model_init=initial_model,
            keep_state=keep_inner_state,
            on_node_done=on_node_done,
        )
        self._shard_cache_size = shard_cache_size
        self.task: SyntheticTask | None = None

    def configure(self, config: TrainingConfig) -> None:
        """Remember the run's config and build its dataset."""
        super().configure(config)
        self.task = SyntheticTask(config.simulation, config.seed, cache_size=self._shard_cache_size)

    def evaluate(self, parameters: TensorMap) -> tuple[float, float]:
        """Loss and accuracy of the global model on the held-out evaluation set."""
        return mlp.evaluate(parameters, *self._require_task().eval_set())

    def _make_trainer(self, node_id: str, config: TrainingConfig) -> SimulationTrainer:
        return SimulationTrainer(node_id, config, task=self._require_task())

    def _require_task(self) -> SyntheticTask:
        if self.task is None:
            raise RuntimeError("call configure(config) before using the simulation")
        return self.task
