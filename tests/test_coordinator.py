"""DiLoCoCoordinator: round checks, outer Nesterov step, credits and the training loop."""

from __future__ import annotations

import numpy as np
import pytest

from aumai_fedtrain import (
    DiLoCoCoordinator,
    FederatedNode,
    GlobalState,
    LocalUpdate,
    TrainingConfig,
)
from tests.helpers import QuadraticProvider, quadratic_nodes

CONFIG = TrainingConfig(
    model_name="t", learning_rate=0.5, batch_size=4, local_steps=3, global_rounds=4, num_nodes=2
)


def two_nodes() -> list[FederatedNode]:
    return [
        FederatedNode(node_id="node-a", address="10.0.0.1:5000", max_samples=64),
        FederatedNode(node_id="node-b", address="10.0.0.2:5000", max_samples=64),
    ]


def upd(node: str, round_id: int = 1, w: object = (0.1, 0.2), samples: int = 64) -> LocalUpdate:
    return LocalUpdate(
        node_id=node, round_id=round_id, gradients={"w": list(w)}, loss=0.5, samples_used=samples
    )


def test_round_without_model_averages_and_credits(backend_name: str) -> None:
    coordinator = DiLoCoCoordinator(backend=backend_name)
    state = coordinator.initialize(CONFIG, two_nodes())

    new_state = coordinator.run_round(
        state, [upd("node-a", w=(0.1, 0.2)), upd("node-b", w=(0.2, 0.1), samples=32)]
    )

    assert state.round_id == 0 and new_state.round_id == 1
    np.testing.assert_allclose(
        new_state.global_weights["w"], [(0.1 * 2 + 0.2) / 3, (0.2 * 2 + 0.1) / 3]
    )
    assert new_state.participating_nodes == ["node-a", "node-b"]
    assert new_state.total_samples == 96
    assert new_state.parameters is None
    assert coordinator.credit_tracker.all_credits() == {"node-a": 64, "node-b": 32}


@pytest.mark.parametrize(
    ("updates", "message"),
    [
        ([upd("node-z")], "node 'node-z': unknown node"),
        ([upd("node-a"), upd("node-a")], "node 'node-a': sent 2 updates for one round"),
        ([upd("node-a", round_id=2)], "node 'node-a': update is for round 2, expected round 1"),
        ([upd("node-b", w=(0.1, float("nan")))], "node 'node-b'.*non-finite"),
        ([upd("node-a"), upd("node-b", w=(0.1, 0.2, 0.3))], "node 'node-b'.*'w'"),
    ],
)
def test_bad_rounds_are_rejected_naming_the_node(updates: list[LocalUpdate], message: str) -> None:
    coordinator = DiLoCoCoordinator()
    state = coordinator.initialize(CONFIG, two_nodes())

    with pytest.raises(ValueError, match=message):
        coordinator.run_round(state, updates)

    assert coordinator.credit_tracker.all_credits() == {}


def test_updates_must_match_the_model() -> None:
    coordinator = DiLoCoCoordinator()
    state = coordinator.initialize(CONFIG, two_nodes(), parameters={"w": np.zeros(2)})

    with pytest.raises(ValueError, match=r"node 'node-a'.*shape"):
        coordinator.run_round(state, [upd("node-a", w=(1.0, 2.0, 3.0))])
    bad_keys = LocalUpdate(
        node_id="node-a", round_id=1, gradients={"v": [1.0, 2.0]}, loss=0.1, samples_used=1
    )
    with pytest.raises(ValueError, match=r"node 'node-a'.*missing keys \['w'\]"):
        coordinator.run_round(state, [bad_keys])


def test_empty_collection_is_the_guides_error() -> None:
    with pytest.raises(ValueError, match=r"^No updates provided for aggregation\.$"):
        DiLoCoCoordinator().collect_updates([])


def test_initialize_rejects_duplicate_nodes_and_run_round_needs_it() -> None:
    with pytest.raises(ValueError, match="duplicate node id 'x'"):
        DiLoCoCoordinator().initialize(CONFIG, [FederatedNode(node_id="x")] * 2)
    with pytest.raises(RuntimeError, match="initialize"):
        DiLoCoCoordinator().run_round(GlobalState(), [upd("node-a")])


def test_fedavg_outer_step_moves_to_the_average_of_node_models() -> None:
    config = CONFIG.model_copy(update={"outer_learning_rate": 1.0, "outer_momentum": 0.0})
    coordinator = DiLoCoCoordinator()
    state = coordinator.initialize(config, two_nodes(), parameters={"w": [1.0, 1.0]})
    node_models = {"node-a": np.array([0.0, 2.0]), "node-b": np.array([2.0, 4.0])}
    updates = [upd(node, w=state.parameters["w"] - theta) for node, theta in node_models.items()]

    new_state = coordinator.run_round(state, updates)

    np.testing.assert_allclose(new_state.parameters["w"], [1.0, 3.0])


def test_nesterov_outer_step_matches_hand_computation(backend_name: str) -> None:
    lr, mu = CONFIG.outer_learning_rate, CONFIG.outer_momentum
    coordinator = DiLoCoCoordinator(backend=backend_name)
    state = coordinator.initialize(CONFIG, two_nodes(), parameters={"w": [0.0, 0.0]})
    d1, d2 = np.array([1.0, -2.0]), np.array([0.5, 0.5])

    s1 = coordinator.run_round(state, [upd("node-a", 1, d1), upd("node-b", 1, d1)])
    s2 = coordinator.run_round(s1, [upd("node-a", 2, d2), upd("node-b", 2, d2)])

    buf1 = d1
    theta1 = -lr * (d1 + mu * buf1)
    buf2 = mu * buf1 + d2
    theta2 = theta1 - lr * (d2 + mu * buf2)
    np.testing.assert_allclose(s1.parameters["w"], theta1, rtol=1e-15)
    np.testing.assert_allclose(s2.parameters["w"], theta2, rtol=1e-15)
    np.testing.assert_allclose(s2.momentum["w"], buf2, rtol=1e-15)


def test_run_training_converges_and_reports_history() -> None:
    nodes, targets = quadratic_nodes()
    provider = QuadraticProvider(targets)
    coordinator = DiLoCoCoordinator()
    records = []

    result = coordinator.run_training(
        CONFIG.model_copy(update={"global_rounds": 12}), nodes, provider, on_round=records.append
    )

    assert provider.config is not None and provider.config.local_steps == CONFIG.local_steps
    assert result.rounds_completed == 12 and records == result.history
    assert [r.round_id for r in result.history] == list(range(1, 13))
    assert result.history[-1].eval_loss < 1e-3 < result.history[0].eval_loss
    assert result.final_loss == result.history[-1].avg_loss
    assert result.total_samples == 12 * 2 * CONFIG.batch_size * CONFIG.local_steps
    assert result.credits == coordinator.credit_tracker.all_credits() == {"a": 144, "b": 144}
    assert result.final_state.round_id == 12


def test_run_training_stops_when_the_provider_returns_nothing() -> None:
    nodes, targets = quadratic_nodes()

    result = DiLoCoCoordinator().run_training(CONFIG, nodes, QuadraticProvider(targets, 2))

    assert result.rounds_completed == 2
    assert result.final_state.round_id == 2


def test_result_credits_list_every_node_even_one_that_never_sent() -> None:
    nodes, targets = quadratic_nodes()
    nodes.append(FederatedNode(node_id="silent"))
    config = CONFIG.model_copy(update={"num_nodes": 3})

    result = DiLoCoCoordinator().run_training(config, nodes, QuadraticProvider(targets))

    assert result.credits["silent"] == 0
    assert result.credits["a"] == result.credits["b"] > 0
