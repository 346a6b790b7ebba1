"""The built-in simulation: virtual nodes that really train an MLP on a synthetic task.

:class:`SimulationProvider` plugs into :meth:`DiLoCoCoordinator.run_training`; the pieces it is
made of (the dataset, the MLP, AdamW and the local training loop) are public for experiments
that need their own loop, such as a synchronous data-parallel baseline. :class:`ByzantineSimulation`
makes chosen nodes send attacked updates (:mod:`aumai_fedtrain.simulation.attacks`).
"""

from aumai_fedtrain.simulation import mlp
from aumai_fedtrain.simulation.adamw import AdamW
from aumai_fedtrain.simulation.attacks import (
    ATTACKS,
    Attack,
    Byzantine,
    ByzantineSimulation,
    corrupt,
)
from aumai_fedtrain.simulation.data import SyntheticTask
from aumai_fedtrain.simulation.provider import (
    NodeProgress,
    SimulationProvider,
    SimulationTrainer,
    builtin_evaluator,
    initial_model,
    new_inner_optimizer,
    shard_of,
    simulated_nodes,
    train_locally,
)
from aumai_fedtrain.simulation.seeding import Stream, derive_rng

__all__ = [
    "ATTACKS",
    "AdamW",
    "Attack",
    "Byzantine",
    "ByzantineSimulation",
    "NodeProgress",
    "SimulationProvider",
    "SimulationTrainer",
    "Stream",
    "SyntheticTask",
    "builtin_evaluator",
    "corrupt",
    "derive_rng",
    "initial_model",
    "mlp",
    "new_inner_optimizer",
    "shard_of",
    "simulated_nodes",
    "train_locally",
]
