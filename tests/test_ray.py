"""The Ray engine on a real Ray: a cluster of two Ray nodes on this machine, started once.

Every test of the module trains on that cluster (``ray.cluster_utils.Cluster``: a head and a
worker node, one CPU each, no dashboard, small object stores); the command-line tests join it
with ``--ray-address`` or start an embedded Ray of their own. Numbers are compared bit for bit
with the in-process engine's.
"""

from __future__ import annotations

import json
import logging
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.cluster_utils import Cluster

from aumai_fedtrain import CompressionConfig, DiLoCoCoordinator, TrainingConfig, TrainingResult
from aumai_fedtrain.providers import InProcessProvider, UpdateProvider
from aumai_fedtrain.providers import ray as ray_engine
from aumai_fedtrain.providers.ray import RayProvider, RaySimulationProvider
from aumai_fedtrain.providers.sampling import SampledProvider
from aumai_fedtrain.simulation import (
    SimulationProvider,
    SimulationTrainer,
    builtin_evaluator,
    initial_model,
    simulated_nodes,
)
from tests.conftest import TORCH_BLOCKED
from tests.helpers import run_cli
from tests.ray_trainers import FaultyTrainers

OBJECT_STORE = 80 * 1024 * 1024
CONFIG = TrainingConfig(num_nodes=6, global_rounds=3, local_steps=3, batch_size=8, seed=11)
NODES = simulated_nodes(CONFIG.num_nodes)
TIMINGS = {"duration_seconds", "node_times", "phase_seconds"}
LIGHT_RAY = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head and a worker Ray node (one CPU each) and this process connected to them."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in LIGHT_RAY.items():
            patch.setenv(name, value)
        node_args = {"num_cpus": 1, "object_store_memory": OBJECT_STORE}
        started = Cluster(
            initialize_head=True, head_node_args=node_args | {"include_dashboard": False}
        )
        try:
            started.add_node(**node_args)
            started.wait_for_nodes()
            ray.init(address=started.address, logging_level=logging.WARNING)
            yield started
        finally:
            ray.shutdown()
            started.shutdown()


def numbers(result: TrainingResult) -> tuple[list[dict[str, Any]], dict[str, int], dict[str, Any]]:
    """Everything a run computed, without its timings."""
    state = result.final_state
    assert state is not None and state.parameters is not None
    return (
        [record.model_dump(mode="json", exclude=TIMINGS) for record in result.history],
        result.credits,
        {key: value.tolist() for key, value in state.parameters.items()},
    )


def train(
    provider: UpdateProvider, config: TrainingConfig = CONFIG, **options: Any
) -> TrainingResult:
    return DiLoCoCoordinator().run_training(
        config, simulated_nodes(config.num_nodes), provider, **options
    )


@pytest.mark.parametrize("keep_inner_state", [True, False])
def test_ray_gives_the_in_process_numbers(cluster: Cluster, keep_inner_state: bool) -> None:
    expected = train(SimulationProvider(keep_inner_state=keep_inner_state))

    with RaySimulationProvider(actors=3, keep_inner_state=keep_inner_state) as provider:
        result = train(provider)
        state = provider.state_dict()

    assert numbers(result) == numbers(expected)
    assert result.history[-1].node_times is not None
    assert result.history[-1].node_times.kind == "training"
    assert sorted({name.split("/")[1] for name in state}) == (
        [node.node_id for node in NODES] if keep_inner_state else []
    )


def test_compressed_updates_give_the_in_process_numbers(cluster: Cluster) -> None:
    config = CONFIG.model_copy(update={"compression": CompressionConfig(codec="int4")})
    expected = train(SimulationProvider(), config)

    with RaySimulationProvider(actors=2) as provider:
        result = train(provider, config)

    assert numbers(result) == numbers(expected)
    assert (
        result.history[-1].bytes_from_nodes
        < train(SimulationProvider()).history[-1].bytes_from_nodes / 10
    )


def test_nodes_are_dealt_to_actors_in_node_id_order_and_stay(cluster: Cluster) -> None:
    with RaySimulationProvider(actors=4) as provider:
        train(provider)

        assert provider.placement() == {f"node-00{i}": i % 4 for i in range(6)}


def test_the_actors_spread_over_both_ray_nodes_of_the_cluster(cluster: Cluster) -> None:
    expected = train(SimulationProvider())

    with RaySimulationProvider(actors=4) as provider:  # 4 x 0.5 CPU: two on each 1-CPU node
        result = train(provider)
        hosts = ray.get(
            [
                provider.actor(index).__ray_call__.remote(
                    lambda host: ray.get_runtime_context().get_node_id()
                )
                for index in range(4)
            ]
        )

    assert len(set(hosts)) == 2
    assert numbers(result) == numbers(expected)


def test_a_seeded_sample_of_the_nodes_gives_the_in_process_numbers(cluster: Cluster) -> None:
    expected = train(SampledProvider(SimulationProvider(), 3))

    with RaySimulationProvider(actors=3) as provider:
        result = train(SampledProvider(provider, 3))

    assert numbers(result) == numbers(expected)
    rounds = [record.participants for record in result.history]
    assert all(len(taken) == 3 for taken in rounds)
    assert len({tuple(taken) for taken in rounds}) > 1


@pytest.mark.parametrize("first", ["in-process", "ray"])
def test_a_checkpoint_of_one_engine_resumes_on_the_other(
    cluster: Cluster, tmp_path: Path, first: str
) -> None:
    expected = train(SimulationProvider())
    two_rounds = CONFIG.model_copy(update={"global_rounds": 2})

    with RaySimulationProvider(actors=2) as on_ray:
        engines: dict[str, UpdateProvider] = {"ray": on_ray, "in-process": SimulationProvider()}
        train(engines.pop(first), two_rounds, checkpoint_dir=tmp_path)
        result = train(engines.popitem()[1], checkpoint_dir=tmp_path, resume=True)

    assert numbers(result) == numbers(expected)


@pytest.mark.skipif(TORCH_BLOCKED, reason="needs torch, which this pass blocks")
def test_a_torch_trainer_on_ray_gives_the_in_process_numbers(cluster: Cluster) -> None:
    from tests import torch_models

    config = CONFIG.model_copy(update={"num_nodes": 3, "global_rounds": 2})
    evaluate = torch_models.evaluate

    def evaluator(parameters: Any) -> tuple[float, float]:
        return evaluate(parameters, config)

    plugins = {"model_init": torch_models.initial_model, "evaluator": evaluator}
    expected = train(InProcessProvider(torch_models.make_trainer, **plugins), config)

    with RayProvider(torch_models.make_trainer, actors=2, **plugins) as provider:
        result = train(provider, config)

    assert numbers(result) == numbers(expected)


def lost_round_reference(lost: set[str], round_id: int, tmp_path: Path) -> TrainingResult:
    """In process: ``lost`` send nothing in ``round_id`` and keep their previous state."""
    provider = InProcessProvider(
        FaultyTrainers("skip", lost, round_id),
        model_init=initial_model,
        evaluator=builtin_evaluator(CONFIG),
    )
    return train(provider, checkpoint_dir=tmp_path / "reference", min_nodes=3)


def assert_lost_round(result: TrainingResult, expected: TrainingResult, reason: str) -> None:
    """``result`` is ``expected`` but for the reason its lost nodes were dropped for."""
    records, credits, parameters = numbers(result)
    expected_records, expected_credits, expected_parameters = numbers(expected)
    for record, expected_record in zip(records, expected_records, strict=True):
        assert record.pop("dropped").keys() == expected_record.pop("dropped").keys()
    assert (records, credits, parameters) == (
        expected_records,
        expected_credits,
        expected_parameters,
    )
    assert result.history[1].dropped
    assert all(why.startswith(reason) for why in result.history[1].dropped.values())


def test_an_actor_killed_mid_round_loses_only_its_nodes_and_comes_back(
    cluster: Cluster, tmp_path: Path
) -> None:
    # node-001 kills its actor's process in round 2; that actor hosts node-001 and node-004
    factory = FaultyTrainers("kill", {"node-001"}, round_id=2)
    options = {"model_init": initial_model, "evaluator": builtin_evaluator(CONFIG)}

    first_actors: list[Any] = []
    with RayProvider(factory, actors=3, **options) as provider:
        result = train(
            provider,
            checkpoint_dir=tmp_path / "ray",
            min_nodes=3,
            on_start=lambda state: first_actors.append(provider.actor(1)),
        )
        replaced = provider.actor(1) is not first_actors[0]

    assert replaced
    assert result.rounds_completed == CONFIG.global_rounds
    assert set(result.history[1].dropped) == {"node-001", "node-004"}
    assert result.history[2].num_participants == CONFIG.num_nodes
    assert_lost_round(
        result, lost_round_reference({"node-001", "node-004"}, 2, tmp_path), "its Ray actor 1 died"
    )


def test_the_nodes_an_actor_answered_before_it_died_count(cluster: Cluster, tmp_path: Path) -> None:
    # actor 1 trains node-001 and answers it; then node-004 kills the actor's process in round
    # 2, a second later (an answer still in flight when its actor dies is lost with it)
    factory = FaultyTrainers("kill", {"node-004"}, round_id=2, delay=1.0)
    options = {"model_init": initial_model, "evaluator": builtin_evaluator(CONFIG)}

    with RayProvider(factory, actors=3, **options) as provider:
        result = train(provider, checkpoint_dir=tmp_path / "ray", min_nodes=3)

    assert result.rounds_completed == CONFIG.global_rounds
    assert result.history[1].dropped.keys() == {"node-004"}
    assert "node-001" in result.history[1].participants
    assert result.history[2].num_participants == CONFIG.num_nodes


def test_a_slow_actor_keeps_the_fast_ones_answers_in_the_object_store(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Calls of 2 nodes on 2 actors: the driver reads a finished call only when its first node
    # is less than 4 nodes past the first unanswered one. node-000 (actor 0) is slow, so actor
    # 1's calls after its first wait, unread, until node-000's call is read.
    monkeypatch.setattr(ray_engine, "CHUNK_NODES", 2)
    read: list[list[str]] = []
    get = ray.get

    def spy(refs: Any, **options: Any) -> Any:
        values = get(refs, **options)
        if isinstance(values, list) and values and hasattr(values[0], "update"):
            read.append([outcome.node_id for outcome in values])
        return values

    monkeypatch.setattr(ray_engine.ray, "get", spy)
    config = CONFIG.model_copy(update={"num_nodes": 32, "global_rounds": 1})
    factory = FaultyTrainers("slow", {"node-000"}, round_id=1, delay=2.0)
    options = {"model_init": initial_model, "evaluator": builtin_evaluator(config)}

    with RayProvider(factory, actors=2, **options) as provider:
        result = train(provider, config)

    assert result.history[0].num_participants == 32
    first = read.index(["node-000", "node-002"])
    assert all(int(chunk[0].split("-")[1]) < 4 for chunk in read[:first])


def test_an_actor_past_the_deadline_loses_its_nodes_for_the_round(
    cluster: Cluster, tmp_path: Path
) -> None:
    factory = FaultyTrainers("sleep", {"node-002"}, round_id=2)
    options = {"model_init": initial_model, "evaluator": builtin_evaluator(CONFIG)}

    with RayProvider(factory, actors=3, timeout=15, **options) as provider:
        result = train(provider, checkpoint_dir=tmp_path / "ray", min_nodes=3)

    assert set(result.history[1].dropped) == {"node-002", "node-005"}
    assert_lost_round(
        result, lost_round_reference({"node-002", "node-005"}, 2, tmp_path), "no answer within 15 s"
    )


def test_a_trainer_error_on_an_actor_ends_the_run_naming_the_node(cluster: Cluster) -> None:
    def broken(node_id: str, config: TrainingConfig) -> Any:
        if node_id == "node-003":
            raise OSError("no data for this node")
        return SimulationTrainer(node_id, config)

    with RayProvider(broken, actors=2) as provider, pytest.raises(RuntimeError) as caught:
        train(provider)

    assert "the trainer factory failed for node 'node-003': OSError: no data for this node" in str(
        caught.value
    )


def test_a_trainer_module_the_workers_cannot_import_is_named(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "driver_only_trainers.py").write_text(
        "from aumai_fedtrain.simulation import SimulationTrainer\n\n\n"
        "def make(node_id, config):\n"
        "    return SimulationTrainer(node_id, config)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # this process only, not the Ray workers
    import driver_only_trainers

    provider = RayProvider(driver_only_trainers.make, actors=1)
    with provider, pytest.raises(RuntimeError) as caught:
        train(provider)

    assert str(caught.value) == (
        "a Ray actor cannot import 'driver_only_trainers', which the trainer factory needs: "
        "install it on every Ray node (or, on one machine, run from its folder)"
    )


def test_the_provider_says_what_it_needs(cluster: Cluster) -> None:
    with pytest.raises(ValueError, match="actor_cpus must be a finite number >= 0"):
        RaySimulationProvider(actor_cpus=-1)
    with pytest.raises(ValueError, match="timeout must be a finite number of seconds > 0"):
        RaySimulationProvider(timeout=0)
    too_many = RaySimulationProvider(actors=2, actor_cpus=2, start_timeout=30)
    with too_many, pytest.raises(RuntimeError) as caught:  # at once, not after 30 s
        train(too_many)
    assert str(caught.value) == (
        "2 actors asking for 2 CPU each need 4, and the Ray cluster has 2 in all: ask for fewer "
        "actors or smaller resources per actor"
    )
    # 1.5 CPUs fit the cluster (two Ray nodes of one CPU), but no Ray node
    too_big = RaySimulationProvider(actors=1, actor_cpus=1.5, start_timeout=3)
    with too_big, pytest.raises(RuntimeError, match=r"Ray placed 0 of 1 actors within 3 s"):
        train(too_big)


# -- the command line ---------------------------------------------------------------------------

CLI_RUN = ["run", "--nodes", "5", "--rounds", "3", "--seed", "4", "--json"]


def cli_numbers(stdout: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    summary = json.loads(stdout)
    history = [{k: v for k, v in r.items() if k not in TIMINGS} for r in summary["history"]]
    return history, summary["credits"]


def test_the_cli_on_a_ray_cluster_gives_the_in_process_output_and_resumes_in_process(
    cluster: Cluster, tmp_path: Path
) -> None:
    sample = ["--sample-nodes", "3"]
    expected = run_cli(*CLI_RUN, *sample)
    assert expected.returncode == 0, expected.stderr
    ray_run = [*CLI_RUN[:4], "2", *CLI_RUN[5:], *sample, "--checkpoint-dir", str(tmp_path)]

    on_ray = run_cli(
        *ray_run,
        "--engine",
        "ray",
        "--ray-address",
        cluster.address,
        "--actors",
        "2",
        "--timeout",
        "600",
    )
    resumed = run_cli(*CLI_RUN, *sample, "--checkpoint-dir", str(tmp_path), "--resume")

    assert on_ray.returncode == 0, on_ray.stderr
    assert resumed.returncode == 0, resumed.stderr
    expected_history, expected_credits = cli_numbers(expected.stdout)
    assert cli_numbers(on_ray.stdout)[0] == expected_history[:2]
    assert cli_numbers(resumed.stdout) == (expected_history, expected_credits)


def test_the_cli_starts_and_stops_an_embedded_ray_by_default() -> None:
    expected = run_cli(*CLI_RUN)

    on_ray = run_cli(*CLI_RUN, "--engine", "ray", "--actor-cpus", "0.25")

    assert on_ray.returncode == 0, on_ray.stderr
    assert cli_numbers(on_ray.stdout) == cli_numbers(expected.stdout)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--actors", "2"], "Error: --actors needs --engine ray"),
        (["--timeout", "9"], "Error: --timeout needs --nodes-file or --engine ray"),
        (["--ray-address", "h:1"], "Error: --ray-address needs --engine ray"),
        (["--engine", "ray", "--nodes-file", "n.json"], "Error: --engine ray cannot go with"),
        (["--sample-nodes", "9"], "Error: --sample-nodes 9 exceeds the 5 nodes of the run"),
        (
            ["--sample-nodes", "2", "--min-nodes", "3"],
            "Error: --min-nodes 3 exceeds the --sample-nodes 2 nodes of a round",
        ),
        (
            ["--engine", "ray", "--ray-address", "127.0.0.1:1"],
            "Error: cannot connect to the Ray cluster at '127.0.0.1:1'",
        ),
    ],
)
def test_the_cli_rejects_engine_options_that_do_not_fit(args: list[str], message: str) -> None:
    failed = run_cli(*CLI_RUN, *args)

    assert failed.returncode == 2
    assert failed.stderr.startswith(message), failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1


def test_the_cli_without_ray_installed_names_the_extra(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import sys
            from importlib.abc import MetaPathFinder

            class NoRay(MetaPathFinder):
                def find_spec(self, name, path, target=None):
                    if name == "ray" or name.startswith("ray."):
                        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                    return None

            sys.meta_path.insert(0, NoRay())
            """
        )
    )
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", path)
        failed = run_cli(*CLI_RUN, "--engine", "ray")
        in_process = run_cli(*CLI_RUN)

    assert failed.returncode == 2
    assert failed.stderr == ("Error: the Ray engine needs Ray: pip install 'aumai-fedtrain[ray]'\n")
    assert in_process.returncode == 0, in_process.stderr
