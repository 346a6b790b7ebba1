"""``InProcessProvider``: nodes that train in this process, one trainer per node id.

Each node's trainer is made by the factory of the node-trainer interface
(:mod:`aumai_fedtrain.trainer`) the first time the node trains, and kept, keyed by node id,
for the rest of the run: removing a node from the list never hands its state to another node,
and a node added on resume starts from the global model with a fresh trainer. Nodes train one
after the other, and each update is handed to the coordinator as soon as it is made
(:meth:`InProcessProvider.iter_updates`), so that the mean is folded as the nodes train.

Nothing crosses a network, so the round's bytes (:meth:`InProcessProvider.round_stats`) are
what the same exchange with real nodes would send on the default (safetensors) wire: the
train request's body once per node, and each valid update's body, computed by the wire
format's own size formulas (:func:`~aumai_fedtrain.providers.hosting.request_bytes`). Node times
are the trainers' ``train`` calls. The trainers are kept by a
:class:`~aumai_fedtrain.providers.hosting.TrainerHost`, the same class each actor of the Ray
engine uses, with the same checkpoint names.
"""

from __future__ import annotations

from collections.abc import Iterator

from aumai_fedtrain.models import (
    FederatedNode,
    GlobalState,
    TensorMap,
    TrainingConfig,
)
from aumai_fedtrain.providers.base import Arrivals
from aumai_fedtrain.providers.hosting import (
    HostedProvider,
    NodeProgress,
    RoundOutcomes,
    TrainerHost,
    split_node_state,
)
from aumai_fedtrain.trainer import NodeTrainer

__all__ = ["InProcessProvider", "NodeProgress"]


class InProcessProvider(HostedProvider):
    """Runs every node's trainer in this process (the simulation engine for any model).

    ``InProcessProvider(factory, *, model_init=None, evaluator=None, keep_state=True,
    on_node_done=None)``: the parameters of
    :class:`~aumai_fedtrain.providers.hosting.HostedProvider`; ``on_node_done`` is called after
    each node of a round.
    """

    _host: TrainerHost | None = None

    def configure(self, config: TrainingConfig) -> None:
        """Remember the run's config; trainers of an earlier run are dropped."""
        super().configure(config)
        self._host = TrainerHost(self.factory, config, self.keep_state)

    def trainer(self, node_id: str) -> NodeTrainer:
        """The trainer of ``node_id``, made by the factory on first use."""
        return self._require_host().trainer(node_id)

    def _round(
        self, round_id: int, state: GlobalState, nodes: list[FederatedNode]
    ) -> Iterator[Arrivals]:
        """Train the nodes one after the other, each update handed over once made."""
        host = self._require_host()
        parameters = state.parameters if state.parameters is not None else {}

        def outcomes() -> RoundOutcomes:
            for done, node in enumerate(nodes, start=1):
                outcome = host.train(node.node_id, round_id, parameters)
                if self.on_node_done is not None:
                    self.on_node_done(done, len(nodes))
                yield {node.node_id: outcome}, {}

        node_ids = [node.node_id for node in nodes]
        yield from self._arrivals(round_id, parameters, node_ids, outcomes())

    def state_dict(self) -> TensorMap:
        """Every kept trainer's state, as ``node/<node_id>/<tensor>``."""
        return self._host.state_dict() if self._host is not None else {}

    def load_state_dict(self, state: TensorMap) -> None:
        """Rebuild the trainers of :meth:`state_dict` (after :meth:`configure`)."""
        if not self.keep_state:
            super().load_state_dict(state)
            return
        per_node = split_node_state(state)
        host = self._require_host()
        host.forget()
        host.load_states(per_node)

    def _require_host(self) -> TrainerHost:
        if self._host is None:
            raise RuntimeError("call configure(config) before training")
        return self._host
