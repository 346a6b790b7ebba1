"""Trainers for the Ray tests: the built-in simulation's, with a fault planned for some nodes.

Ray pickles the factory to its actors, which import this module by name (the repository root
is on their path, as it is on the test process's).
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Collection
from typing import Literal

from aumai_fedtrain.models import TensorMap, TrainingConfig
from aumai_fedtrain.simulation import SimulationTrainer

Fault = Literal["kill", "sleep", "skip", "slow"]


class FaultyTrainers:
    """A factory of built-in trainers; in ``round_id``, each of ``nodes`` meets ``fault``.

    ``kill``: the trainer kills its own process (a Ray actor dying mid-round), ``delay``
    seconds after it is asked (so that the answers its actor sent before have arrived).
    ``sleep``: it sleeps far past any deadline. ``slow``: it trains after ``delay`` seconds.
    ``skip``: it returns a non-finite loss without training, so the node is dropped for the
    round with its state unchanged (the in-process picture of a node whose round was lost and
    whose state came back from the last checkpoint).
    """

    def __init__(
        self, fault: Fault, nodes: Collection[str], round_id: int, delay: float = 0.0
    ) -> None:
        self.fault = fault
        self.nodes = frozenset(nodes)
        self.round_id = round_id
        self.delay = delay

    def __call__(self, node_id: str, config: TrainingConfig) -> SimulationTrainer:
        return _FaultyTrainer(self, node_id, config)


class _FaultyTrainer(SimulationTrainer):
    def __init__(self, plan: FaultyTrainers, node_id: str, config: TrainingConfig) -> None:
        super().__init__(node_id, config)
        self.plan = plan

    def train(self, round_id: int, parameters: TensorMap) -> tuple[TensorMap, float, int]:
        if round_id == self.plan.round_id and self.node_id in self.plan.nodes:
            if self.plan.fault == "kill":
                time.sleep(self.plan.delay)
                os.kill(os.getpid(), signal.SIGKILL)
            if self.plan.fault == "sleep":
                time.sleep(3600)
            if self.plan.fault == "slow":
                time.sleep(self.plan.delay)
                return super().train(round_id, parameters)
            return {}, math.nan, 0
        return super().train(round_id, parameters)
