"""``InProcessProvider``: nodes that train in this process, one trainer per node id.

Each node's trainer is made by the factory of the node-trainer interface
(:mod:`aumai_fedtrain.trainer`) the first time the node trains, and kept, keyed by node id,
for the rest of the run: removing a node from the list never hands its state to another node,
and a node added on resume starts from the global model with a fresh trainer. Nodes train one
after the other.

Nothing crosses a network, so the round's bytes (:meth:`InProcessProvider.round_stats`) are
what the same exchange with real nodes would send on the default (safetensors) wire: the
train request's body once per node, and each valid update's body, computed by the wire
format's own size formula (:func:`~aumai_fedtrain.network.wire.request_body_bytes`,
:func:`~aumai_fedtrain.network.wire.update_body_bytes`). Node times are the trainers'
``train`` calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aumai_fedtrain.models import (
    FederatedNode,
    GlobalState,
    LocalUpdate,
    TensorMap,
    TrainingConfig,
)
from aumai_fedtrain.network.wire import expected_tensors, request_body_bytes, update_body_bytes
from aumai_fedtrain.providers.base import RoundStats, UpdateProvider
from aumai_fedtrain.trainer import (
    Evaluator,
    ModelInit,
    NodeTrainer,
    TrainerFactory,
    TrainerResultError,
    as_update,
    checked_state,
)

__all__ = ["InProcessProvider", "NodeProgress"]

NodeProgress = Callable[[int, int], None]
"""Called as ``(nodes_done, nodes_total)`` after each node of a round has trained."""

_STATE_PREFIX = "node/"


class InProcessProvider(UpdateProvider):
    """Runs every node's trainer in this process (the simulation engine for any model).

    Parameters
    ----------
    factory
        ``factory(node_id, config) -> NodeTrainer`` (see :mod:`aumai_fedtrain.trainer`).
    model_init
        ``model_init(config) -> parameters``: the initial global model; None runs without one
        (the coordinator then only averages the updates).
    evaluator
        ``evaluate(parameters) -> (loss, accuracy)`` of the global model, or None.
    keep_state
        Keep each node's trainer (and so its inner optimizer state) across rounds, as DiLoCo
        does; with False every round makes a fresh trainer, which keeps no memory per node.
    on_node_done
        Optional progress hook, called after each node of a round.
    """

    def __init__(
        self,
        factory: TrainerFactory,
        *,
        model_init: ModelInit | None = None,
        evaluator: Evaluator | None = None,
        keep_state: bool = True,
        on_node_done: NodeProgress | None = None,
    ) -> None:
        self.factory = factory
        self.model_init = model_init
        self.evaluator = evaluator
        self.keep_state = keep_state
        self.on_node_done = on_node_done
        self._trainers: dict[str, NodeTrainer] = {}
        self._failures: dict[int, dict[str, str]] = {}
        self._stats: dict[int, RoundStats] = {}

    def configure(self, config: TrainingConfig) -> None:
        """Remember the run's config; trainers of an earlier run are dropped."""
        super().configure(config)
        self._trainers.clear()
        self._failures.clear()
        self._stats.clear()

    def initial_parameters(self, config: TrainingConfig) -> TensorMap | None:
        """The initial global model from ``model_init`` (None without one)."""
        return self.model_init(config) if self.model_init is not None else None

    def evaluate(self, parameters: TensorMap) -> tuple[float, float] | None:
        """Held-out loss and accuracy from ``evaluator``, or None without one."""
        return self.evaluator(parameters) if self.evaluator is not None else None

    def trainer(self, node_id: str) -> NodeTrainer:
        """The trainer of ``node_id``, made by the factory on first use."""
        trainer = self._trainers.get(node_id)
        if trainer is None:
            try:
                trainer = self.factory(node_id, self._require_config())
            except Exception as exc:
                raise RuntimeError(
                    f"the trainer factory failed for node {node_id!r}: {type(exc).__name__}: {exc}"
                ) from exc
            if self.keep_state:
                self._trainers[node_id] = trainer
        return trainer

    def get_updates(
        self, round_id: int, state: GlobalState, nodes: list[FederatedNode]
    ) -> list[LocalUpdate]:
        """Train every node from ``state.parameters`` and return the updates.

        A node whose trainer returns an invalid result (a non-finite loss, say) is left out
        with its reason in :meth:`round_failures`; an exception raised by a trainer ends the
        round with an error naming the node.
        """
        parameters = state.parameters if state.parameters is not None else {}
        updates: list[LocalUpdate] = []
        failures: dict[str, str] = {}
        seconds: dict[str, float] = {}
        received = 0
        for done, node in enumerate(nodes, start=1):
            started = time.perf_counter()
            result = self._train(node.node_id, round_id, parameters)
            seconds[node.node_id] = time.perf_counter() - started
            try:
                update = as_update(result, node.node_id, round_id)
            except TrainerResultError as exc:
                failures[node.node_id] = str(exc)
            else:
                updates.append(update)
                received += update_body_bytes(update)
            if self.on_node_done is not None:
                self.on_node_done(done, len(nodes))
        self._failures = {round_id: failures}
        sent = request_body_bytes(round_id, expected_tensors(parameters)) * len(nodes)
        self._stats = {round_id: RoundStats(sent, received, seconds, "training")}
        return updates

    def round_stats(self, round_id: int) -> RoundStats | None:
        """Bytes (as the safetensors wire would move them) and training times of ``round_id``."""
        return self._stats.get(round_id)

    def round_failures(self, round_id: int) -> dict[str, str]:
        """Nodes whose trainer returned no valid update in ``round_id``, with why."""
        return dict(self._failures.get(round_id, {}))

    def state_dict(self) -> TensorMap:
        """Every kept trainer's state, as ``node/<node_id>/<tensor>``."""
        return {
            f"{_STATE_PREFIX}{node_id}/{key}": value
            for node_id, trainer in self._trainers.items()
            for key, value in checked_state(node_id, trainer.state_dict()).items()
        }

    def load_state_dict(self, state: TensorMap) -> None:
        """Rebuild the trainers of :meth:`state_dict` (after :meth:`configure`)."""
        if not self.keep_state:
            super().load_state_dict(state)
            return
        per_node: dict[str, TensorMap] = {}
        for name, value in state.items():
            prefix, node_id, key = _split_state_name(name)
            if prefix != _STATE_PREFIX or not node_id or not key:
                raise ValueError(f"unexpected provider state tensor {name!r}")
            per_node.setdefault(node_id, {})[key] = value
        self._trainers.clear()
        for node_id, trainer_state in per_node.items():
            self.trainer(node_id).load_state_dict(trainer_state)

    def _train(self, node_id: str, round_id: int, parameters: TensorMap) -> object:
        trainer = self.trainer(node_id)
        try:
            return trainer.train(round_id, parameters)
        except Exception as exc:
            raise RuntimeError(
                f"the trainer of node {node_id!r} failed in round {round_id}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def _require_config(self) -> TrainingConfig:
        if self.config is None:
            raise RuntimeError("call configure(config) before training")
        return self.config


def _split_state_name(name: str) -> tuple[str, str, str]:
    """``node/<node_id>/<tensor>`` as its three parts (node ids hold no ``/``)."""
    prefix, _, rest = name.partition("/")
    node_id, _, key = rest.partition("/")
    return prefix + "/", node_id, key
