"""The mean folded as updates arrive: screening on arrival, a reorder buffer in node-list
order, several waiting updates per fold, and the same run as the round's list gives.

The providers here are the built-in simulation (real training) with its updates handed over
in a scripted order; the HTTP provider's memory budget is checked on its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from aumai_fedtrain import DiLoCoCoordinator, FederatedNode, GlobalState, LocalUpdate
from aumai_fedtrain.models import AggregationConfig, TensorMap, TrainingConfig, TrainingResult
from aumai_fedtrain.network.provider import _Dropped, _MemoryBudget, _RoundDeadline
from aumai_fedtrain.providers import Arrivals
from aumai_fedtrain.robust import RobustAggregator
from aumai_fedtrain.simulation import SimulationProvider, simulated_nodes

NODES = 5
# Arrivals per round, by node index: an update, or ("silent", i) for a node that sends none.
SCRIPT: list[int | tuple[str, int]] = [2, 1, ("silent", 3), 0, 4]


class ScriptedProvider(SimulationProvider):
    """The simulation's updates, handed over one at a time in :data:`SCRIPT`'s order (node 3
    is silent: it trains, but its update is never handed over), each released by the
    coordinator when it lets go of it."""

    def __init__(self, script: list[int | tuple[str, int] | None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.script = script
        self.closed = False
        self.released: list[str] = []
        self.failed: dict[int, dict[str, str]] = {}

    def iter_updates(
        self, round_id: int, state: GlobalState, nodes: list[FederatedNode]
    ) -> Iterator[Arrivals]:
        updates = {update.node_id: update for update in self.get_updates(round_id, state, nodes)}
        self.failed[round_id] = {}
        try:
            yield from self._play(nodes, updates, round_id)
        finally:
            self.closed = True

    def _play(
        self, nodes: list[FederatedNode], updates: dict[str, LocalUpdate], round_id: int
    ) -> Iterator[Arrivals]:
        for step in self.script:
            if step is None:
                yield None  # type: ignore[misc]  # a broken provider
                continue
            if isinstance(step, tuple):
                node_id = nodes[step[1]].node_id
                self.failed[round_id][node_id] = "scripted silence"
                yield Arrivals([], silent=[node_id])
                continue
            update = updates[nodes[step].node_id]
            yield Arrivals(
                [update], release=lambda node_id=update.node_id: self.released.append(node_id)
            )

    def round_failures(self, round_id: int) -> dict[str, str]:
        return dict(self.failed.get(round_id, {}))


class ListedProvider(SimulationProvider):
    """The simulation without node 3's update, as one list (the default ``iter_updates``)."""

    def get_updates(
        self, round_id: int, state: GlobalState, nodes: list[FederatedNode]
    ) -> list[LocalUpdate]:
        updates = super().get_updates(round_id, state, nodes)
        return [update for update in updates if update.node_id != nodes[3].node_id]

    def round_failures(self, round_id: int) -> dict[str, str]:
        return {simulated_nodes(NODES)[3].node_id: "scripted silence"}


def folds_spied(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The labels of every fold of the running mean, one list per fold call."""
    folds: list[list[str]] = []
    running_sum = RobustAggregator.running_sum

    class Spy:
        def __init__(self, aggregator: RobustAggregator) -> None:
            self.total = running_sum(aggregator)

        def fold(self, updates: Any, weights: Any, labels: Any = None) -> None:
            folds.append(list(labels))
            self.total.fold(updates, weights, labels)

        def finish(self) -> TensorMap:
            return self.total.finish()

    monkeypatch.setattr(RobustAggregator, "running_sum", lambda self: Spy(self))
    return folds


def train(provider: SimulationProvider, backend: str, rounds: int = 2) -> TrainingResult:
    config = TrainingConfig(num_nodes=NODES, global_rounds=rounds, seed=3)
    return DiLoCoCoordinator(backend=backend).run_training(config, simulated_nodes(NODES), provider)


def assert_same_run(actual: TrainingResult, expected: TrainingResult) -> None:
    """Same history (but for times), credits and final model, bit for bit."""
    timeless = {"duration_seconds", "phase_seconds", "node_times"}
    assert [r.model_dump(exclude=timeless) for r in actual.history] == [
        r.model_dump(exclude=timeless) for r in expected.history
    ]
    assert actual.credits == expected.credits
    final, reference = actual.final_state, expected.final_state
    assert final is not None and reference is not None
    assert final.parameters is not None and reference.parameters is not None
    for key, value in reference.parameters.items():
        assert final.parameters[key].tobytes() == value.tobytes(), key
    assert final.global_weights is not None and reference.global_weights is not None
    for key, value in reference.global_weights.items():
        assert final.global_weights[key].tobytes() == value.tobytes(), key


def test_updates_wait_for_earlier_nodes_and_fold_in_node_order(
    monkeypatch: pytest.MonkeyPatch, backend_name: str
) -> None:
    # Prepare
    folds = folds_spied(monkeypatch)
    provider = ScriptedProvider(SCRIPT)

    # Execute
    result = train(provider, backend_name)

    # Assert: nodes 2 and 1 wait for node 0, then 0, 1, 2 are folded in one call (3 is
    # silent), then 4 on its own.
    names = [node.node_id for node in simulated_nodes(NODES)]
    assert folds == [[names[0], names[1], names[2]], [names[4]]] * 2
    assert provider.released == [names[i] for i in (0, 1, 2, 4)] * 2
    assert result.history[0].participants == [names[i] for i in (0, 1, 2, 4)]
    assert result.history[0].dropped == {names[3]: "scripted silence"}


def test_a_streamed_round_equals_the_rounds_list_in_node_order(backend_name: str) -> None:
    streamed = train(ScriptedProvider(SCRIPT), backend_name)
    listed = train(ListedProvider(), backend_name)
    assert_same_run(streamed, listed)


def test_robust_rules_and_norm_clipping_collect_the_whole_round() -> None:
    config = TrainingConfig(num_nodes=NODES)
    assert RobustAggregator(config).streams
    for aggregation in (AggregationConfig(rule="median"), AggregationConfig(norm_clip=2.0)):
        assert not RobustAggregator(config.model_copy(update={"aggregation": aggregation})).streams


def test_a_second_update_of_a_waiting_node_counts_neither(backend_name: str) -> None:
    # Node 2's update arrives twice while it waits for node 0: node 2 counts none.
    provider = ScriptedProvider([2, 2, 1, ("silent", 3), 0, 4])
    result = train(provider, backend_name, rounds=1)
    names = [node.node_id for node in simulated_nodes(NODES)]
    assert result.history[0].participants == [names[i] for i in (0, 1, 4)]
    assert result.history[0].dropped == {
        names[3]: "scripted silence",
        names[2]: "sent 2 updates for one round",
    }
    assert sorted(provider.released) == sorted(names[i] for i in (0, 1, 2, 2, 4))


def test_a_second_update_of_a_folded_node_is_a_provider_error(backend_name: str) -> None:
    provider = ScriptedProvider([0, 0, 1, 2, ("silent", 3), 4])
    with pytest.raises(RuntimeError, match="second update of node 'node-000' after its first"):
        train(provider, backend_name, rounds=1)
    assert provider.closed  # the coordinator closed the provider's generator at once


def test_a_provider_that_yields_something_else_than_arrivals_is_named() -> None:
    provider = ScriptedProvider([0, None, 1, 2, ("silent", 3), 4])
    with pytest.raises(
        TypeError, match=r"ScriptedProvider.iter_updates yielded NoneType, expected"
    ):
        train(provider, "native", rounds=1)
    assert provider.closed


def test_held_updates_never_keep_an_answer_waiting_but_answers_in_flight_do() -> None:
    # A slow early node must not starve the others: updates waiting for it to be folded are
    # counted, but an answer does not wait for them (it would be dropped at the deadline).
    budget = _MemoryBudget(100)
    with _RoundDeadline(30.0) as deadline:
        with budget.reserve("b", 60, deadline) as share:
            share.keep(50)  # b's update is handed over and waits for a (slow)
        # answers being read and decoded still share the budget: d waits for c
        with (
            budget.reserve("c", 90, deadline),
            pytest.raises(_Dropped, match="no memory budget free"),
            budget.reserve("d", 60, _RoundDeadline(0.2)),
        ):
            pass
        release = budget.held("b")
        release()  # b is folded
        release()  # (its bytes come back once)
        with budget.reserve("d", 100, deadline):
            pass
    with (
        pytest.raises(_Dropped, match="more than the memory budget"),
        budget.reserve("e", 101, _RoundDeadline(1.0)),
    ):
        pass


@pytest.mark.parametrize("script", [[("silent", 0), 0, 1, 2, 4], [("silent", 1), 1, 0, 2, 4]])
def test_an_update_after_the_provider_said_none_is_a_provider_error(
    script: list[int | tuple[str, int] | None],
) -> None:
    # whether or not earlier nodes are still pending when it comes
    provider = ScriptedProvider(script)
    with pytest.raises(RuntimeError, match="after saying it would send none this round"):
        train(provider, "native", rounds=1)
