"""The built-in simulation as an :class:`UpdateProvider`: real local training of virtual nodes.

Each virtual node starts a round from the global parameters, takes ``local_steps`` AdamW steps
on mini-batches of its own shard and returns the pseudo-gradient
``theta_global - theta_node``. Nodes are trained one after the other, so memory holds one
node's model and optimizer state at a time (plus the returned updates).

As in the DiLoCo paper, each node keeps its inner AdamW state across rounds; it is never
communicated, but it is part of the run's checkpoints (:meth:`SimulationProvider.state_dict`),
so a resumed run reproduces an uninterrupted one bit for bit. It costs two model-sized arrays
per node. ``SimulationProvider(keep_inner_state=False)`` makes the nodes stateless instead:
every round starts from a fresh AdamW, which costs no memory per node but trains clearly worse
(see ``docs/experiments.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from aumai_fedtrain.models import (
    FederatedNode,
    GlobalState,
    LocalUpdate,
    TensorMap,
    TrainingConfig,
)
from aumai_fedtrain.providers.base import UpdateProvider
from aumai_fedtrain.simulation import mlp
from aumai_fedtrain.simulation.adamw import AdamW
from aumai_fedtrain.simulation.data import SyntheticTask
from aumai_fedtrain.simulation.seeding import Stream, derive_rng

__all__ = [
    "NodeProgress",
    "SimulationProvider",
    "initial_model",
    "new_inner_optimizer",
    "simulated_nodes",
    "train_locally",
]

NodeProgress = Callable[[int, int], None]
"""Called as ``(nodes_done, nodes_total)`` after each node of a round has trained."""


def simulated_nodes(count: int) -> list[FederatedNode]:
    """``count`` virtual nodes named ``node-000``, ``node-001``, ... (the simulation's shards)."""
    width = max(3, len(str(count - 1)))
    return [
        FederatedNode(node_id=f"node-{index:0{width}d}", address=f"sim://{index}")
        for index in range(count)
    ]


def initial_model(config: TrainingConfig) -> TensorMap:
    """The seeded initial global model of a run."""
    sim = config.simulation
    return mlp.init_parameters(
        sim.num_features, sim.hidden_units, sim.num_classes, derive_rng(config.seed, Stream.INIT)
    )


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


class SimulationProvider(UpdateProvider):
    """Virtual nodes that really train an MLP on shards of the built-in synthetic task.

    The node at position ``i`` of the node list trains on shard ``i``; everything random is a
    function of ``(config.seed, node, round)``, so the updates are deterministic.

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
        self.on_node_done = on_node_done
        self._shard_cache_size = shard_cache_size
        self._inner_states: dict[int, AdamW] | None = {} if keep_inner_state else None
        self.task: SyntheticTask | None = None

    def configure(self, config: TrainingConfig) -> None:
        """Remember the run's config and build its dataset."""
        super().configure(config)
        self.task = SyntheticTask(config.simulation, config.seed, cache_size=self._shard_cache_size)
        if self._inner_states is not None:
            self._inner_states.clear()

    def initial_parameters(self, config: TrainingConfig) -> TensorMap:
        """The seeded initial MLP of the run."""
        return initial_model(config)

    def get_updates(
        self,
        round_id: int,
        state: GlobalState,
        nodes: list[FederatedNode],
    ) -> list[LocalUpdate]:
        """Train every node from ``state.parameters`` and return their pseudo-gradients."""
        config, task = self._require_configured()
        if state.parameters is None:
            raise ValueError("the simulation needs the global parameters in state.parameters")
        if len(nodes) > config.num_nodes:
            raise ValueError(
                f"{len(nodes)} nodes given but the simulation has shards for "
                f"config.num_nodes={config.num_nodes}"
            )
        samples = config.local_steps * config.batch_size
        updates = []
        for index, node in enumerate(nodes):
            optimizer = None
            if self._inner_states is not None:
                optimizer = self._inner_states.setdefault(index, new_inner_optimizer(config))
            delta, loss = train_locally(state.parameters, task, index, round_id, config, optimizer)
            if not math.isfinite(loss):
                raise ValueError(
                    f"node {node.node_id!r} diverged in round {round_id} (mean loss {loss}); "
                    "lower the learning_rate"
                )
            updates.append(
                LocalUpdate(
                    node_id=node.node_id,
                    round_id=round_id,
                    gradients=delta,
                    loss=loss,
                    samples_used=samples,
                )
            )
            if self.on_node_done is not None:
                self.on_node_done(index + 1, len(nodes))
        return updates

    def state_dict(self) -> TensorMap:
        """Every node's inner AdamW state (``node/<index>/<tensor>``); empty when stateless."""
        return {
            f"node/{index}/{key}": value
            for index, optimizer in (self._inner_states or {}).items()
            for key, value in optimizer.state_dict().items()
        }

    def load_state_dict(self, state: TensorMap) -> None:
        """Restore the nodes' inner optimizers from :meth:`state_dict` (after configure)."""
        config, _ = self._require_configured()
        if self._inner_states is None:
            super().load_state_dict(state)
            return
        per_node: dict[int, TensorMap] = {}
        for name, value in state.items():
            _, index, key = name.split("/", 2)
            per_node.setdefault(int(index), {})[key] = value
        self._inner_states.clear()
        for index, optimizer_state in per_node.items():
            optimizer = new_inner_optimizer(config)
            optimizer.load_state_dict(optimizer_state)
            self._inner_states[index] = optimizer

    def evaluate(self, parameters: TensorMap) -> tuple[float, float]:
        """Loss and accuracy of the global model on the held-out evaluation set."""
        _, task = self._require_configured()
        return mlp.evaluate(parameters, *task.eval_set())

    def _require_configured(self) -> tuple[TrainingConfig, SyntheticTask]:
        if self.config is None or self.task is None:
            raise RuntimeError("call configure(config) before using the simulation")
        return self.config, self.task
