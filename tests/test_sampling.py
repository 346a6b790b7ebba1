"""Partial participation: a seeded sample of the nodes per round, on any engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from aumai_fedtrain import DiLoCoCoordinator, TrainingConfig
from aumai_fedtrain.providers.sampling import SampledProvider, sample_nodes
from aumai_fedtrain.simulation import SimulationProvider, simulated_nodes

NODES = simulated_nodes(10)


def ids(round_id: int, seed: int = 3, count: int = 4) -> list[str]:
    return [node.node_id for node in sample_nodes(NODES, count, seed, round_id)]


def test_the_sample_is_a_function_of_seed_and_round_in_node_list_order() -> None:
    drawn = [ids(round_id) for round_id in range(1, 9)]

    assert drawn == [ids(round_id) for round_id in range(1, 9)]
    assert all(len(set(chosen)) == 4 and chosen == sorted(chosen) for chosen in drawn)
    assert len({tuple(chosen) for chosen in drawn}) > 1
    assert ids(1, seed=4) != ids(1) or ids(2, seed=4) != ids(2)


def test_a_sample_as_large_as_the_run_is_every_node() -> None:
    assert sample_nodes(NODES, 10, 0, 1) == NODES
    assert sample_nodes(NODES, 12, 0, 1) == NODES
    with pytest.raises(ValueError, match="at least one node"):
        sample_nodes(NODES, 0, 0, 1)


def test_a_sampled_run_trains_only_the_sample_and_resumes_exactly(tmp_path: Path) -> None:
    config = TrainingConfig(num_nodes=10, global_rounds=4, local_steps=2, batch_size=8, seed=3)
    coordinator = DiLoCoCoordinator()
    expected = coordinator.run_training(config, NODES, SampledProvider(SimulationProvider(), 4))

    two = config.model_copy(update={"global_rounds": 2})
    DiLoCoCoordinator().run_training(
        two, NODES, SampledProvider(SimulationProvider(), 4), checkpoint_dir=tmp_path
    )
    resumed = DiLoCoCoordinator().run_training(
        config,
        NODES,
        SampledProvider(SimulationProvider(), 4),
        checkpoint_dir=tmp_path,
        resume=True,
    )

    assert [record.participants for record in expected.history] == [
        ids(round_id) for round_id in range(1, 5)
    ]
    assert [r.avg_loss for r in resumed.history] == [r.avg_loss for r in expected.history]
    assert [r.eval_loss for r in resumed.history] == [r.eval_loss for r in expected.history]
    assert resumed.credits == expected.credits
    assert sum(expected.credits.values()) == 4 * 4 * config.local_steps * config.batch_size
