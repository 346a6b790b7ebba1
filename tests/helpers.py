"""Test doubles and helpers shared by the test modules."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from aumai_fedtrain import FederatedNode, GlobalState, LocalUpdate, TrainingConfig, UpdateProvider
from aumai_fedtrain.models import TensorMap
from aumai_fedtrain.trainer import TrainerFactory

CLI_TIMEOUT = 300


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m aumai_fedtrain ARGS`` (bounded in time) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "aumai_fedtrain", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


class QuadraticProvider(UpdateProvider):
    """Nodes that minimise ``0.5 * |theta - target_i|^2`` with plain gradient steps.

    A real (if tiny) model with a known optimum, so outer-step arithmetic can be checked by
    hand. ``stop_after`` makes the provider return no updates from that round on.
    """

    def __init__(self, targets: dict[str, float], stop_after: int | None = None) -> None:
        self.targets = targets
        self.stop_after = stop_after
        self.rounds_seen: list[int] = []

    def initial_parameters(self, config: TrainingConfig) -> TensorMap:
        return {"theta": np.zeros(3)}

    def evaluate(self, parameters: TensorMap) -> tuple[float, float]:
        centre = np.mean(list(self.targets.values()))
        return float(np.sum((parameters["theta"] - centre) ** 2)), 1.0

    def get_updates(
        self, round_id: int, state: GlobalState, nodes: list[FederatedNode]
    ) -> list[LocalUpdate]:
        assert self.config is not None, "configure() must run before get_updates()"
        self.rounds_seen.append(round_id)
        if self.stop_after is not None and round_id > self.stop_after:
            return []
        assert state.parameters is not None
        updates = []
        for node in nodes:
            if node.node_id not in self.targets:  # an absent node: sends nothing
                continue
            theta = state.parameters["theta"].copy()
            target = self.targets[node.node_id]
            losses = []
            for _ in range(self.config.local_steps):
                losses.append(0.5 * float(np.sum((theta - target) ** 2)))
                theta -= self.config.learning_rate * (theta - target)
            updates.append(
                LocalUpdate(
                    node_id=node.node_id,
                    round_id=round_id,
                    gradients={"theta": state.parameters["theta"] - theta},
                    loss=float(np.mean(losses)),
                    samples_used=self.config.batch_size * self.config.local_steps,
                )
            )
        return updates


def quadratic_nodes() -> tuple[list[FederatedNode], dict[str, float]]:
    targets = {"a": 1.0, "b": 3.0}
    return [FederatedNode(node_id=node_id) for node_id in targets], targets


class FunctionTrainer:
    """A stateless node trainer that calls ``train(round_id, parameters, config)``."""

    def __init__(
        self, train: Callable[[int, TensorMap, TrainingConfig], Any], config: TrainingConfig
    ):
        self._train = train
        self._config = config

    def train(self, round_id: int, parameters: TensorMap) -> Any:
        return self._train(round_id, parameters, self._config)

    def state_dict(self) -> TensorMap:
        return {}

    def load_state_dict(self, state: TensorMap) -> None:
        assert not state


def function_trainer(train: Callable[[int, TensorMap, TrainingConfig], Any]) -> TrainerFactory:
    """A trainer factory whose trainers call ``train(round_id, parameters, config)``."""
    return lambda node_id, config: FunctionTrainer(train, config)


class HostileProvider(UpdateProvider):
    """Wraps a provider and replaces the update of node ``hostile`` by ``forge(update)``.

    The forged update is built with ``model_construct`` (no validation), as a provider that
    decodes a hostile answer could hand it over, so screening is what has to stop it.
    """

    def __init__(
        self, inner: UpdateProvider, hostile: str, forge: Callable[[LocalUpdate], dict[str, Any]]
    ):
        self.inner = inner
        self.hostile = hostile
        self.forge = forge

    def configure(self, config: TrainingConfig) -> None:
        super().configure(config)
        self.inner.configure(config)

    def initial_parameters(self, config: TrainingConfig) -> TensorMap | None:
        return self.inner.initial_parameters(config)

    def evaluate(self, parameters: TensorMap) -> tuple[float, float] | None:
        return self.inner.evaluate(parameters)

    def get_updates(
        self, round_id: int, state: GlobalState, nodes: list[FederatedNode]
    ) -> list[LocalUpdate]:
        honest = [node for node in nodes if node.node_id != self.hostile]
        updates = self.inner.get_updates(round_id, state, honest)
        template = updates[0]
        fields = {**template.__dict__, "node_id": self.hostile}
        fields.update(self.forge(template))
        return [*updates, LocalUpdate.model_construct(**fields)]
