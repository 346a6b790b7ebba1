"""What every engine that hosts node trainers shares: :class:`TrainerHost` and the round's bytes.

A :class:`TrainerHost` keeps the trainers of some nodes (made by the factory of the node-trainer
interface, :mod:`aumai_fedtrain.trainer`, keyed by node id) and trains them one after the other.
The in-process engine has one host for all its nodes; the Ray engine runs one host per Ray
actor. Both store a node's trainer state under the same checkpoint names, ``node/<id>/<tensor>``
(:func:`node_state_names`, :func:`split_node_state`), so a checkpoint written by one engine
resumes on the other.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from aumai_fedtrain.compression import Codec, CompressingTrainer
from aumai_fedtrain.models import (
    FederatedNode,
    GlobalState,
    LocalUpdate,
    TensorMap,
    TrainingConfig,
)
from aumai_fedtrain.network.wire import expected_tensors, request_body_bytes, update_body_bytes
from aumai_fedtrain.providers.base import (
    Arrivals,
    RoundStats,
    UpdateProvider,
    updates_in_node_order,
)
from aumai_fedtrain.trainer import (
    Evaluator,
    ModelInit,
    NodeTrainer,
    TrainerFactory,
    TrainerResultError,
    as_update,
    checked_state,
)

__all__ = [
    "HostedProvider",
    "NodeOutcome",
    "NodeProgress",
    "TrainerHost",
    "node_state_names",
    "request_bytes",
    "split_node_state",
]

_STATE_PREFIX = "node/"

NodeProgress = Callable[[int, int], None]
"""Called as ``(nodes_done, nodes_total)`` as the nodes of a round finish training."""


@dataclass(frozen=True)
class NodeOutcome:
    """One node's round: its update, or why it has none, and the trainer's seconds."""

    node_id: str
    update: LocalUpdate | None
    failure: str | None
    seconds: float
    body_bytes: int | None = None
    """The size of the update's compressed body when the run compresses (else None: the
    wire's float body, :func:`update_body_bytes`)."""


class TrainerHost:
    """The trainers of the nodes one process hosts, each made on first use and kept by node id.

    Parameters
    ----------
    factory
        ``factory(node_id, config) -> NodeTrainer``.
    config
        The run's configuration, handed to the factory.
    keep_state
        Keep each node's trainer across rounds; with False every round makes a fresh one.
    """

    def __init__(self, factory: TrainerFactory, config: TrainingConfig, keep_state: bool) -> None:
        self.factory = factory
        self.config = config
        self.keep_state = keep_state
        self.trainers: dict[str, NodeTrainer] = {}

    def ready(self) -> bool:
        """True (a Ray actor answers it once it has started)."""
        return True

    def trainer(self, node_id: str) -> NodeTrainer:
        """The trainer of ``node_id``, made by the factory on first use (compressing its
        updates when the run's ``compression`` chooses a codec)."""
        trainer = self.trainers.get(node_id)
        if trainer is None:
            try:
                trainer = self.factory(node_id, self.config)
            except Exception as exc:
                raise RuntimeError(
                    f"the trainer factory failed for node {node_id!r}: {type(exc).__name__}: {exc}"
                ) from exc
            compression = self.config.compression
            if compression.codec != "none":
                trainer = CompressingTrainer(
                    trainer, Codec.of(compression), node_id, compression.error_feedback
                )
            if self.keep_state:
                self.trainers[node_id] = trainer
        return trainer

    def train(self, node_id: str, round_id: int, parameters: TensorMap) -> NodeOutcome:
        """Train ``node_id`` for ``round_id`` from ``parameters`` (seconds: making the trainer and
        its ``train`` call).

        A trainer's invalid result (a non-finite loss, say) is the outcome's ``failure``; an
        exception raised by the trainer is a ``RuntimeError`` naming the node.
        """
        started = time.perf_counter()
        trainer = self.trainer(node_id)
        try:
            result = trainer.train(round_id, parameters)
        except Exception as exc:
            raise RuntimeError(
                f"the trainer of node {node_id!r} failed in round {round_id}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        seconds = time.perf_counter() - started
        try:
            update = as_update(result, node_id, round_id)
        except TrainerResultError as exc:
            return NodeOutcome(node_id, None, str(exc), seconds)
        compressed = trainer.last_body_bytes if isinstance(trainer, CompressingTrainer) else None
        return NodeOutcome(node_id, update, None, seconds, compressed)

    def train_many(
        self, node_ids: Sequence[str], round_id: int, parameters: TensorMap
    ) -> list[NodeOutcome]:
        """:meth:`train` for each of ``node_ids`` in turn (one call per round on a Ray actor)."""
        return [self.train(node_id, round_id, parameters) for node_id in node_ids]

    def state_dict(self) -> TensorMap:
        """Every kept trainer's state, as ``node/<node_id>/<tensor>``."""
        return node_state_names(
            {
                node_id: checked_state(node_id, trainer.state_dict())
                for node_id, trainer in self.trainers.items()
            }
        )

    def load_states(self, per_node: Mapping[str, TensorMap]) -> None:
        """Give each node of ``per_node`` a trainer restored from its state (others are kept)."""
        for node_id, state in per_node.items():
            self.trainers.pop(node_id, None)
            self.trainer(node_id).load_state_dict(dict(state))

    def forget(self) -> None:
        """Drop every trainer (a restored run reloads them with :meth:`load_states`)."""
        self.trainers.clear()


def node_state_names(per_node: Mapping[str, TensorMap]) -> TensorMap:
    """``{node_id: {tensor: value}}`` as the checkpoint's flat ``node/<node_id>/<tensor>``."""
    return {
        f"{_STATE_PREFIX}{node_id}/{key}": value
        for node_id, state in per_node.items()
        for key, value in state.items()
    }


def split_node_state(state: TensorMap) -> dict[str, TensorMap]:
    """The checkpoint's ``node/<node_id>/<tensor>`` names grouped by node id.

    A name of another form is a ``ValueError`` naming it (node ids hold no ``/``).
    """
    per_node: dict[str, TensorMap] = {}
    for name, value in state.items():
        prefix, _, rest = name.partition("/")
        node_id, _, key = rest.partition("/")
        if prefix + "/" != _STATE_PREFIX or not node_id or not key:
            raise ValueError(f"unexpected provider state tensor {name!r}")
        per_node.setdefault(node_id, {})[key] = value
    return per_node


def request_bytes(round_id: int, parameters: TensorMap, nodes: int) -> int:
    """Bytes of the round's train requests on the default (safetensors) wire: the request's
    body once per node asked, by the wire format's own size formula (each valid update's body
    is :func:`~aumai_fedtrain.network.wire.update_body_bytes`)."""
    return request_body_bytes(round_id, expected_tensors(parameters)) * nodes


RoundOutcomes = Iterator[tuple[Mapping[str, NodeOutcome], Mapping[str, str]]]
"""A round's outcomes as they come: ``(outcomes by node id, nodes lost with why)`` batches."""


class HostedProvider(UpdateProvider):
    """What the engines that host trainers (in process, on Ray) share: the model, the evaluation,
    and each round's failures and statistics from the nodes' :class:`NodeOutcome`.

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
        Optional progress hook.
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
        self._failures: dict[int, dict[str, str]] = {}
        self._stats: dict[int, RoundStats] = {}

    def configure(self, config: TrainingConfig) -> None:
        """Remember the run's config and forget an earlier run's rounds."""
        super().configure(config)
        self._failures.clear()
        self._stats.clear()

    def initial_parameters(self, config: TrainingConfig) -> TensorMap | None:
        """The initial global model from ``model_init`` (None without one)."""
        return self.model_init(config) if self.model_init is not None else None

    def evaluate(self, parameters: TensorMap) -> tuple[float, float] | None:
        """Held-out loss and accuracy from ``evaluator``, or None without one."""
        return self.evaluator(parameters) if self.evaluator is not None else None

    def round_stats(self, round_id: int) -> RoundStats | None:
        """Bytes (as the safetensors wire would move them) and training times of ``round_id``."""
        return self._stats.get(round_id)

    def round_failures(self, round_id: int) -> dict[str, str]:
        """Nodes that sent no valid update in ``round_id``, with why."""
        return dict(self._failures.get(round_id, {}))

    def get_updates(
        self, round_id: int, state: GlobalState, nodes: list[FederatedNode]
    ) -> list[LocalUpdate]:
        """Train ``nodes`` from ``state.parameters`` and return the updates, in the order of
        ``nodes``.

        A node whose trainer returns an invalid result (a non-finite loss, say), or that the
        engine lost, is left out with its reason in :meth:`round_failures`; an exception
        raised by a trainer ends the round with an error naming the node.
        """
        return updates_in_node_order(self._round(round_id, state, nodes), nodes)

    def iter_updates(
        self, round_id: int, state: GlobalState, nodes: list[FederatedNode]
    ) -> Iterator[Arrivals]:
        """:meth:`get_updates`, each update handed over as soon as its node has trained (a
        subclass that overrides :meth:`get_updates` is asked for its list instead)."""
        if type(self).get_updates is not HostedProvider.get_updates:
            return super().iter_updates(round_id, state, nodes)
        return self._round(round_id, state, nodes)

    @abstractmethod
    def _round(
        self, round_id: int, state: GlobalState, nodes: list[FederatedNode]
    ) -> Iterator[Arrivals]:
        """Train ``nodes`` and hand their outcomes over as they come (:meth:`_arrivals`)."""

    def _arrivals(
        self,
        round_id: int,
        parameters: TensorMap,
        node_ids: Sequence[str],
        batches: RoundOutcomes,
    ) -> Iterator[Arrivals]:
        """Hand each batch of outcomes over as it comes (its valid updates; its failed and lost
        nodes as silent); once all are in, keep the round's failures (in the order of
        ``node_ids``) and statistics for the coordinator."""
        failures: dict[str, str] = {}
        seconds: dict[str, float] = {}
        received = 0
        for outcomes, lost in batches:
            updates: list[LocalUpdate] = []
            for node_id, outcome in outcomes.items():
                seconds[node_id] = outcome.seconds
                if outcome.update is not None:
                    updates.append(outcome.update)
                    received += (
                        outcome.body_bytes
                        if outcome.body_bytes is not None
                        else update_body_bytes(outcome.update)
                    )
                else:
                    failures[node_id] = str(outcome.failure)
            failures |= lost
            silent = [node_id for node_id in (*outcomes, *lost) if node_id in failures]
            yield Arrivals(updates, silent=silent)
            del updates
        self._failures = {
            round_id: {node_id: failures[node_id] for node_id in node_ids if node_id in failures}
        }
        sent = request_bytes(round_id, parameters, len(node_ids))
        self._stats = {round_id: RoundStats(sent, received, seconds, "training")}
