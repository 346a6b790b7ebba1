"""Partial participation: a seeded sample of ``m`` of the ``N`` nodes trains each round.

:class:`SampledProvider` wraps any provider (in-process, Ray, HTTP): each round it asks the
wrapped provider for the updates of :func:`sample_nodes` only, as Flower's ``fraction_fit``
does. The sample is a function of the run's seed, the round and the node list alone, so a run
is reproducible for a seed, the same on every engine, and a resumed run samples the rounds it
has left exactly as the uninterrupted run would. The nodes left out of a round are neither
dropped nor benched: they sit it out, and the round's record lists who took part.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from aumai_fedtrain.models import FederatedNode, GlobalState, LocalUpdate, TensorMap, TrainingConfig
from aumai_fedtrain.providers.base import Arrivals, RoundStats, UpdateProvider

__all__ = ["SampledProvider", "sample_nodes"]

_SEED_MODULUS = 1 << 128
_SAMPLE_STREAM = 1_000  # keeps the sample's stream apart from the simulation's (seeding.Stream)


def sample_nodes(
    nodes: Sequence[FederatedNode], count: int, seed: int, round_id: int
) -> list[FederatedNode]:
    """``count`` of ``nodes`` drawn without replacement for ``round_id``, in node-list order.

    The draw is seeded by ``(seed, round_id)``; all nodes when ``count >= len(nodes)``.
    """
    if count < 1:
        raise ValueError(f"the sample must hold at least one node, got {count}")
    if count >= len(nodes):
        return list(nodes)
    rng = np.random.default_rng(
        np.random.SeedSequence((seed % _SEED_MODULUS, _SAMPLE_STREAM, round_id))
    )
    chosen = np.sort(rng.choice(len(nodes), size=count, replace=False))
    return [nodes[index] for index in chosen]


class SampledProvider(UpdateProvider):
    """Asks ``provider`` for a seeded sample of ``sample_nodes`` nodes each round.

    Everything else (the model, the evaluation, failures, statistics, checkpointed state) is
    the wrapped provider's.

    Parameters
    ----------
    provider
        The provider whose nodes train.
    sample_nodes
        How many nodes train each round (all of them when the run has no more).
    """

    def __init__(self, provider: UpdateProvider, sample_nodes: int) -> None:
        if sample_nodes < 1:
            raise ValueError(f"sample_nodes must be at least 1, got {sample_nodes}")
        self.provider = provider
        self.sample_nodes = sample_nodes

    def configure(self, config: TrainingConfig) -> None:
        """Configure this and the wrapped provider."""
        super().configure(config)
        self.provider.configure(config)

    def initial_parameters(self, config: TrainingConfig) -> TensorMap | None:
        """The wrapped provider's initial model."""
        return self.provider.initial_parameters(config)

    def evaluate(self, parameters: TensorMap) -> tuple[float, float] | None:
        """The wrapped provider's evaluation."""
        return self.provider.evaluate(parameters)

    def get_updates(
        self, round_id: int, state: GlobalState, nodes: list[FederatedNode]
    ) -> list[LocalUpdate]:
        """The updates of this round's sample of ``nodes``."""
        return self.provider.get_updates(round_id, state, self._sample(round_id, nodes))

    def iter_updates(
        self, round_id: int, state: GlobalState, nodes: list[FederatedNode]
    ) -> Iterator[Arrivals]:
        """The nodes left out of this round's sample (silent), then the wrapped provider's
        arrivals from the sample."""
        chosen = self._sample(round_id, nodes)
        asked = {node.node_id for node in chosen}
        yield Arrivals([], silent=[node.node_id for node in nodes if node.node_id not in asked])
        yield from self.provider.iter_updates(round_id, state, chosen)

    def _sample(self, round_id: int, nodes: list[FederatedNode]) -> list[FederatedNode]:
        if self.config is None:
            raise RuntimeError("call configure(config) before training")
        return sample_nodes(nodes, self.sample_nodes, self.config.seed, round_id)

    def round_failures(self, round_id: int) -> dict[str, str]:
        """The wrapped provider's failures of ``round_id``."""
        return self.provider.round_failures(round_id)

    def round_stats(self, round_id: int) -> RoundStats | None:
        """The wrapped provider's statistics of ``round_id``."""
        return self.provider.round_stats(round_id)

    def state_dict(self) -> TensorMap:
        """The wrapped provider's state (the sample itself keeps none)."""
        return self.provider.state_dict()

    def load_state_dict(self, state: TensorMap) -> None:
        """Restore the wrapped provider's state."""
        self.provider.load_state_dict(state)
