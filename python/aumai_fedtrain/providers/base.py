"""The injection point between the coordinator and the nodes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from aumai_fedtrain.models import FederatedNode, GlobalState, LocalUpdate, TensorMap, TrainingConfig


@dataclass
class RoundStats:
    """What a provider measured in a round: bytes each way, the nodes' times, who was benched.

    Parameters
    ----------
    bytes_to_nodes
        Bytes of the request bodies sent to the nodes.
    bytes_from_nodes
        Bytes of the answer bodies received from the nodes.
    node_seconds
        Node id -> seconds, for every node asked.
    time_kind
        ``"answer"`` (a node's answer time, seen from the coordinator) or ``"training"``
        (the trainer's time, for nodes in this process).
    benched
        Nodes that were benched and sat the round out.
    """

    bytes_to_nodes: int
    bytes_from_nodes: int
    node_seconds: dict[str, float] = field(default_factory=dict)
    time_kind: Literal["answer", "training"] = "answer"
    benched: list[str] = field(default_factory=list)


@dataclass
class Arrivals:
    """What a provider hands over at once while a round runs (:meth:`UpdateProvider.iter_updates`).

    Parameters
    ----------
    updates
        Updates that arrived (the coordinator takes them out of the object, so that an
        update it has folded is not kept alive by it).
    silent
        Nodes known to send no update this round (failed, benched or not asked): the
        coordinator need not wait for them before folding the updates of later nodes. Why they
        sent none still comes from :meth:`UpdateProvider.round_failures`.
    release
        Called once the coordinator no longer holds ``updates`` (folded into the mean or
        refused), for a provider that counts held updates against a memory budget.
    """

    updates: list[LocalUpdate]
    silent: list[str] = field(default_factory=list)
    release: Callable[[], None] | None = None


def updates_in_node_order(
    arrivals: Iterable[Arrivals], nodes: Sequence[FederatedNode]
) -> list[LocalUpdate]:
    """Every update of ``arrivals`` (each batch released once taken), in the order of
    ``nodes``: a round's list, from its stream."""
    updates: list[LocalUpdate] = []
    for arrival in arrivals:
        updates.extend(arrival.updates)
        if arrival.release is not None:
            arrival.release()
    order = {node.node_id: index for index, node in enumerate(nodes)}
    return sorted(updates, key=lambda update: order[update.node_id])


class UpdateProvider(ABC):
    """Produces the nodes' :class:`LocalUpdate` objects for each round.

    Implement :meth:`get_updates` to plug in real nodes or a simulator. The coordinator calls
    :meth:`configure` with the run's :class:`TrainingConfig` before the first round, so
    ``self.config`` (e.g. ``self.config.local_steps``) is available inside ``get_updates``.

    A provider that trains a model also implements :meth:`initial_parameters` (the coordinator
    then keeps global parameters and applies the outer optimizer to them) and may implement
    :meth:`evaluate` to report held-out loss and accuracy of the global model every round. A
    provider that keeps state across rounds implements :meth:`state_dict` and
    :meth:`load_state_dict` so that checkpoints carry it.
    """

    config: TrainingConfig | None = None

    def configure(self, config: TrainingConfig) -> None:
        """Receive the run's configuration before the first round."""
        self.config = config

    def initial_parameters(self, config: TrainingConfig) -> TensorMap | None:
        """Global model parameters at round 0, or None when the run has no model."""
        return None

    def evaluate(self, parameters: TensorMap) -> tuple[float, float] | None:
        """Held-out ``(loss, accuracy)`` of the global ``parameters``, or None."""
        return None

    def round_failures(self, round_id: int) -> dict[str, str]:
        """Nodes whose update for ``round_id`` did not arrive or did not count, with why.

        The coordinator adds them to the round's :attr:`RoundRecord.dropped`.
        """
        return {}

    def round_stats(self, round_id: int) -> RoundStats | None:
        """Bytes moved, the nodes' times and the benched nodes of ``round_id``, or None.

        The coordinator puts them into the round's :class:`RoundRecord`; the default (None)
        leaves those fields empty.
        """
        return None

    def state_dict(self) -> TensorMap:
        """State the provider keeps across rounds (e.g. nodes' inner optimizers), as tensors.

        The coordinator stores it in every checkpoint and hands it back to
        :meth:`load_state_dict` on resume, so a resumed run continues exactly. Stateless
        providers keep the default (empty).
        """
        return {}

    def load_state_dict(self, state: TensorMap) -> None:
        """Restore what :meth:`state_dict` returned (called after :meth:`configure`)."""
        if state:
            raise ValueError(
                f"{type(self).__name__} keeps no state, but the checkpoint holds "
                f"{len(state)} provider tensors"
            )

    def iter_updates(
        self,
        round_id: int,
        state: GlobalState,
        nodes: list[FederatedNode],
    ) -> Iterator[Arrivals]:
        """Hand the round's updates over as they arrive, for the coordinator to screen and fold
        into the mean before the round ends.

        The default yields :meth:`get_updates` at once. A provider that overrides it yields at
        most one update per node (a second one from a node whose first update the coordinator
        already folded is a ``RuntimeError``: the mean cannot be taken back; one whose first
        is still waiting makes the node count none, as in :meth:`get_updates`), says which
        nodes will send none as soon as it knows (:attr:`Arrivals.silent`), and has
        :meth:`round_failures` ready when the iterator ends.
        """
        yield Arrivals(self.get_updates(round_id, state, nodes))

    @abstractmethod
    def get_updates(
        self,
        round_id: int,
        state: GlobalState,
        nodes: list[FederatedNode],
    ) -> list[LocalUpdate]:
        """Return the nodes' updates for ``round_id`` given the previous round's ``state``.

        When the run has a model, ``state.parameters`` holds the global parameters the nodes
        start from. Returning an empty list ends the run early.
        """
