"""The built-in simulation: dataset, MLP, AdamW, the provider and the DiLoCo experiment script."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import aumai_fedtrain
from aumai_fedtrain.coordinator import DiLoCoCoordinator
from aumai_fedtrain.models import (
    FederatedNode,
    GlobalState,
    LocalUpdate,
    SimulationConfig,
    TrainingConfig,
)
from aumai_fedtrain.simulation import (
    AdamW,
    SimulationProvider,
    SyntheticTask,
    derive_rng,
    initial_model,
    mlp,
)
from aumai_fedtrain.simulation.seeding import Stream

REPO = Path(__file__).resolve().parents[1]

SMALL = SimulationConfig(
    num_features=6, num_classes=4, hidden_units=8, samples_per_node=64, eval_samples=200
)


def make_nodes(count: int) -> list[FederatedNode]:
    return [FederatedNode(node_id=f"node-{i:03d}") for i in range(count)]


def round_updates(
    config: TrainingConfig, round_id: int = 1, **provider_options: bool
) -> list[LocalUpdate]:
    """Updates of one round from the initial model with a freshly configured provider."""
    provider = SimulationProvider(**provider_options)
    provider.configure(config)
    state = GlobalState(parameters=provider.initial_parameters(config))
    return provider.get_updates(round_id, state, make_nodes(config.num_nodes))


def assert_same_updates(left: list[LocalUpdate], right: list[LocalUpdate]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right, strict=True):
        assert a.loss == b.loss
        for key in a.gradients:
            np.testing.assert_array_equal(a.gradients[key], b.gradients[key])


# --- dataset ------------------------------------------------------------------------------


def test_shards_are_deterministic_per_node_and_seed() -> None:
    task, again = SyntheticTask(SMALL, 7), SyntheticTask(SMALL, 7, cache_size=0)
    for node in (0, 5, 999):
        np.testing.assert_array_equal(task.shard(node)[0], again.shard(node)[0])
        np.testing.assert_array_equal(task.shard(node)[1], again.shard(node)[1])
    assert not np.array_equal(task.shard(0)[0], task.shard(1)[0])
    assert not np.array_equal(task.shard(0)[0], SyntheticTask(SMALL, 8).shard(0)[0])
    assert task.shard(3)[0].shape == (SMALL.samples_per_node, SMALL.num_features)


def test_shard_cache_is_bounded() -> None:
    task = SyntheticTask(SMALL, 0, cache_size=2)
    for node in range(10):
        task.shard(node)
    assert len(task._cache) == 2
    with pytest.raises(ValueError, match="cache_size"):
        SyntheticTask(SMALL, 0, cache_size=-1)


def test_negative_seeds_are_accepted() -> None:
    task = SyntheticTask(SMALL, -3)
    assert not np.array_equal(task.shard(0)[0], SyntheticTask(SMALL, 3).shard(0)[0])
    with pytest.raises(ValueError, match="node index"):
        task.shard(-1)


def label_skew(config: SimulationConfig, nodes: int = 40) -> float:
    """Mean total-variation distance between each shard's label histogram and uniform."""
    task = SyntheticTask(config, 0, cache_size=0)
    uniform = 1.0 / config.num_classes
    distances = [
        0.5
        * np.abs(
            np.bincount(task.shard(node)[1], minlength=config.num_classes) / config.samples_per_node
            - uniform
        ).sum()
        for node in range(nodes)
    ]
    return float(np.mean(distances))


def test_small_dirichlet_alpha_skews_the_label_distributions() -> None:
    config = SimulationConfig(num_classes=10, samples_per_node=2000)
    iid = label_skew(config)
    skewed = label_skew(config.model_copy(update={"dirichlet_alpha": 0.1}))
    mild = label_skew(config.model_copy(update={"dirichlet_alpha": 10.0}))
    assert iid < 0.06  # sampling noise only
    assert skewed > 0.6  # most of each shard is one or two classes
    assert iid < mild < skewed


def test_shard_labels_follow_the_node_label_distribution() -> None:
    config = SimulationConfig(num_classes=5, samples_per_node=20000, dirichlet_alpha=0.5)
    task = SyntheticTask(config, 1)
    for node in range(3):
        proportions = task.label_distribution(node)
        assert proportions.shape == (5,) and math.isclose(proportions.sum(), 1.0)
        counts = np.bincount(task.shard(node)[1], minlength=5) / config.samples_per_node
        np.testing.assert_allclose(counts, proportions, atol=0.015)
    iid = SyntheticTask(config.model_copy(update={"dirichlet_alpha": None}), 1)
    np.testing.assert_array_equal(iid.label_distribution(0), np.full(5, 0.2))


def test_eval_set_is_balanced_and_held_out() -> None:
    config = SimulationConfig(eval_samples=5000)
    task = SyntheticTask(config, 0)
    features, labels = task.eval_set()
    assert features.shape == (5000, config.num_features)
    assert np.bincount(labels, minlength=10).min() > 400
    assert not np.isin(features[:, 0], task.shard(0)[0][:, 0]).any()


def test_batches_are_epochs_of_the_shard() -> None:
    task = SyntheticTask(SMALL, 0)
    features, _ = task.shard(2)
    rows = np.concatenate([x for x, _ in task.batches(2, 1, steps=12, batch_size=16)])
    assert rows.shape == (192, SMALL.num_features)
    # 192 rows = 3 full passes over the 64-row shard: each row exactly 3 times
    _, counts = np.unique(rows[:, 0], return_counts=True)
    assert set(counts) == {3} and len(counts) == len(features)
    again = np.concatenate([x for x, _ in task.batches(2, 1, steps=12, batch_size=16)])
    np.testing.assert_array_equal(rows, again)
    other_round = np.concatenate([x for x, _ in task.batches(2, 2, steps=12, batch_size=16)])
    assert not np.array_equal(rows, other_round)


def test_bayes_loss_matches_the_closed_form_for_two_gaussians() -> None:
    config = SimulationConfig(
        num_features=3, num_classes=2, clusters_per_class=1, cluster_std=1.3, eval_samples=500
    )
    task = SyntheticTask(config, 4)
    features, labels = task.eval_set()
    mu0, mu1 = task.centres[0, 0], task.centres[1, 0]
    # log p(1|x) - log p(0|x) is linear in x for equal isotropic covariances
    logit = (features @ (mu1 - mu0) - 0.5 * (mu1 @ mu1 - mu0 @ mu0)) / config.cluster_std**2
    expected = np.mean(np.logaddexp(0.0, np.where(labels == 1, -logit, logit)))
    assert task.bayes_loss(features, labels) == pytest.approx(expected, rel=1e-12)


# --- MLP ----------------------------------------------------------------------------------


def test_mlp_gradients_match_finite_differences() -> None:
    rng = np.random.default_rng(0)
    params = mlp.init_parameters(5, 7, 3, rng)
    features = rng.standard_normal((11, 5))
    labels = rng.integers(3, size=11)
    _, grads = mlp.loss_and_grads(params, features, labels)
    assert (
        grads.keys()
        == params.keys()
        == {"layer1.weight", "layer1.bias", "layer2.weight", "layer2.bias"}
    )
    eps = 1e-6
    for key, value in params.items():
        numeric = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            original = value[index]
            value[index] = original + eps
            plus, _ = mlp.loss_and_grads(params, features, labels)
            value[index] = original - eps
            minus, _ = mlp.loss_and_grads(params, features, labels)
            value[index] = original
            numeric[index] = (plus - minus) / (2 * eps)
        np.testing.assert_allclose(grads[key], numeric, rtol=1e-6, atol=1e-9, err_msg=key)


def test_mlp_init_loss_and_evaluate() -> None:
    rng = np.random.default_rng(1)
    params = mlp.init_parameters(32, 64, 10, rng)
    assert params["layer1.weight"].shape == (64, 32) and params["layer2.bias"].shape == (10,)
    assert np.abs(params["layer1.weight"]).max() <= 1 / math.sqrt(32)
    features, labels = rng.standard_normal((500, 32)), rng.integers(10, size=500)
    loss, accuracy = mlp.evaluate(params, features, labels)
    assert abs(loss - math.log(10)) < 0.2  # small logits at init: close to uniform
    assert loss == pytest.approx(mlp.loss_and_grads(params, features, labels)[0], rel=1e-12)
    assert 0.0 <= accuracy <= 1.0


# --- AdamW --------------------------------------------------------------------------------


def test_adamw_matches_hand_computed_steps() -> None:
    lr, weight_decay, beta1, beta2, eps = 0.1, 0.01, 0.9, 0.999, 1e-8
    optimizer = AdamW(lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
    params = {"w": np.array([1.0, -2.0])}
    # step 1, gradient (0.5, 0): m = 0.05, v = 0.00025 -> m_hat = 0.5, sqrt(v_hat) = 0.5
    optimizer.step(params, {"w": np.array([0.5, 0.0])})
    first = 1.0 * (1 - lr * weight_decay) - lr * 0.5 / (0.5 + eps)
    np.testing.assert_allclose(params["w"], [first, -2.0 * (1 - lr * weight_decay)], rtol=1e-15)
    assert first == pytest.approx(0.899000002, abs=1e-12)
    # step 2, gradient (-1, 0): m = -0.055, v = 0.00124975
    optimizer.step(params, {"w": np.array([-1.0, 0.0])})
    m_hat = -0.055 / (1 - beta1**2)
    v_hat = 0.00124975 / (1 - beta2**2)
    second = first * (1 - lr * weight_decay) - lr * m_hat / (math.sqrt(v_hat) + eps)
    np.testing.assert_allclose(params["w"][0], second, rtol=1e-13)
    assert second == pytest.approx(0.9347113542, abs=1e-9)
    # a parameter that never had a gradient only decays (decoupled weight decay)
    assert params["w"][1] == -2.0 * (1 - lr * weight_decay) ** 2
    assert optimizer.steps == 2


def test_adamw_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        AdamW(0.0)
    with pytest.raises(ValueError):
        AdamW(0.1, betas=(1.0, 0.999))
    with pytest.raises(ValueError):
        AdamW(0.1, weight_decay=-1.0)


# --- provider -----------------------------------------------------------------------------


def test_updates_have_the_model_shapes_and_counts() -> None:
    config = TrainingConfig(num_nodes=4, local_steps=3, batch_size=5, simulation=SMALL)
    updates = round_updates(config, round_id=2)
    params = initial_model(config)
    assert [update.node_id for update in updates] == [f"node-{i:03d}" for i in range(4)]
    for update in updates:
        assert update.round_id == 2
        assert update.samples_used == 15
        assert update.gradients.keys() == params.keys()
        for key, value in update.gradients.items():
            assert value.shape == params[key].shape and value.dtype == np.float64
            assert np.abs(value).max() > 0
        assert math.isfinite(update.loss) and update.loss > 0
    assert len({update.loss for update in updates}) == 4  # each node has its own data


def test_updates_are_deterministic_for_a_seed() -> None:
    config = TrainingConfig(num_nodes=3, simulation=SMALL, seed=11)
    assert_same_updates(round_updates(config), round_updates(config))
    other = round_updates(config.model_copy(update={"seed": 12}))
    assert not np.array_equal(
        other[0].gradients["layer1.weight"], round_updates(config)[0].gradients["layer1.weight"]
    )
    assert not np.array_equal(
        initial_model(config)["layer1.weight"],
        initial_model(config.model_copy(update={"seed": 12}))["layer1.weight"],
    )


def test_a_stateless_round_depends_only_on_the_global_state() -> None:
    """Stateless nodes: a fresh provider reproduces a later round of a running one."""
    config = TrainingConfig(num_nodes=3, simulation=SMALL)
    nodes = make_nodes(3)
    provider = SimulationProvider(keep_inner_state=False)
    provider.configure(config)
    state = GlobalState(parameters=provider.initial_parameters(config))
    provider.get_updates(1, state, nodes)
    later = provider.get_updates(2, state, nodes)
    assert_same_updates(round_updates(config, round_id=2, keep_inner_state=False), later)
    assert provider.state_dict() == {}
    assert not np.array_equal(
        later[0].gradients["layer1.bias"],
        round_updates(config, round_id=1)[0].gradients["layer1.bias"],
    )


def test_kept_inner_state_changes_later_rounds_only() -> None:
    config = TrainingConfig(num_nodes=2, simulation=SMALL)
    nodes = make_nodes(2)
    kept = SimulationProvider()
    kept.configure(config)
    state = GlobalState(parameters=kept.initial_parameters(config))
    assert_same_updates(kept.get_updates(1, state, nodes), round_updates(config, round_id=1))
    second = kept.get_updates(2, state, nodes)
    assert not np.array_equal(
        second[0].gradients["layer1.weight"],
        round_updates(config, round_id=2, keep_inner_state=False)[0].gradients["layer1.weight"],
    )


def test_kept_inner_state_is_restored_from_its_state_dict() -> None:
    """What makes resume exact: the nodes' optimizers travel in the checkpoint."""
    # Prepare: a provider that has run round 1, and a fresh one given its state
    config = TrainingConfig(num_nodes=2, simulation=SMALL)
    nodes = make_nodes(2)
    running = SimulationProvider()
    running.configure(config)
    state = GlobalState(parameters=running.initial_parameters(config))
    running.get_updates(1, state, nodes)
    saved = running.state_dict()
    restored = SimulationProvider()
    restored.configure(config)
    restored.load_state_dict(saved)

    # Execute
    expected, actual = running.get_updates(2, state, nodes), restored.get_updates(2, state, nodes)

    # Assert
    assert sorted({name.split("/")[1] for name in saved}) == [n.node_id for n in nodes]
    assert_same_updates(expected, actual)
    with pytest.raises(ValueError, match="keeps no state"):
        stateless = SimulationProvider(keep_inner_state=False)
        stateless.configure(config)
        stateless.load_state_dict(saved)


def test_provider_errors_are_clear() -> None:
    config = TrainingConfig(num_nodes=2, simulation=SMALL)
    provider = SimulationProvider()
    with pytest.raises(RuntimeError, match="configure"):
        provider.evaluate(initial_model(config))
    provider.configure(config)
    wrong = {"layer1.weight": np.zeros((2, 2))}
    with pytest.raises(RuntimeError, match=r"node 'node-000' failed in round 1.*built-in model"):
        provider.get_updates(1, GlobalState(parameters=wrong), make_nodes(2))


def test_a_diverging_node_is_a_clear_error_without_numpy_warnings() -> None:
    import warnings

    config = TrainingConfig(num_nodes=2, learning_rate=1e200, simulation=SMALL)
    provider = SimulationProvider()
    provider.configure(config)
    state = GlobalState(parameters=provider.initial_parameters(config))

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        updates = provider.get_updates(1, state, make_nodes(2))

    assert updates == []
    failures = provider.round_failures(1)
    assert sorted(failures) == ["node-000", "node-001"]
    assert "non-finite loss nan: the node's local training diverged" in failures["node-000"]


def test_progress_hook_sees_every_node() -> None:
    seen: list[tuple[int, int]] = []
    config = TrainingConfig(num_nodes=3, simulation=SMALL)
    provider = SimulationProvider(on_node_done=lambda done, total: seen.append((done, total)))
    provider.configure(config)
    provider.get_updates(1, GlobalState(parameters=initial_model(config)), make_nodes(3))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_a_thousand_virtual_nodes_in_one_process() -> None:
    config = TrainingConfig(num_nodes=1000, local_steps=1, batch_size=8, simulation=SMALL)
    updates = round_updates(config)
    assert len(updates) == 1000 and len({update.node_id for update in updates}) == 1000
    assert sum(update.samples_used for update in updates) == 8000


def test_guide_run_halves_the_training_loss() -> None:
    """The guide's `aumai-fedtrain run --config examples/train.json --nodes 3` setting."""
    config = TrainingConfig(
        learning_rate=0.001, batch_size=32, local_steps=10, global_rounds=5, num_nodes=3
    )
    result = DiLoCoCoordinator().run_training(config, make_nodes(3), SimulationProvider())
    history = result.history
    assert len(history) == 5
    assert history[-1].avg_loss < 0.5 * history[0].avg_loss
    assert [record.total_samples for record in history] == [3 * 320] * 5
    losses = [record.eval_loss for record in history]
    assert all(later < earlier for earlier, later in itertools.pairwise(losses))
    assert history[-1].eval_accuracy is not None and history[-1].eval_accuracy > 0.6


def test_longer_training_keeps_improving_above_the_bayes_floor() -> None:
    config = TrainingConfig(
        num_nodes=4,
        global_rounds=40,
        learning_rate=0.003,
        simulation=SimulationConfig(samples_per_node=2048, hidden_units=64),
    )
    provider = SimulationProvider()
    result = DiLoCoCoordinator().run_training(config, make_nodes(4), provider)
    assert provider.task is not None
    bayes = provider.task.bayes_loss(*provider.task.eval_set())
    first, final = result.history[0], result.history[-1]
    assert first.eval_loss is not None and final.eval_loss is not None
    assert bayes < final.eval_loss < 0.15 * first.eval_loss
    assert final.eval_accuracy is not None and final.eval_accuracy > 0.9


def test_derive_rng_separates_streams() -> None:
    a = derive_rng(0, Stream.SHARD, 1).random()
    assert a == derive_rng(0, Stream.SHARD, 1).random()
    assert a != derive_rng(0, Stream.BATCHES, 1).random()
    assert a != derive_rng(0, Stream.SHARD, 2).random()


# --- the DiLoCo experiment ----------------------------------------------------------------


def test_diloco_experiment_quick_run(tmp_path: Path) -> None:
    package_root = str(Path(aumai_fedtrain.__file__).resolve().parents[1])
    path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "diloco_vs_sync.py"),
            "--quick",
            "--json",
            "--plot",
            str(tmp_path / "plot.png"),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": path},
    )
    report = json.loads(completed.stdout.splitlines()[0])
    results = {result["method"]: result for result in report["results"]}
    sync = results["synchronous"]
    expected = [f"DiLoCo H={inner}" for inner in (1, 10, 50, 100)]
    expected += [f"DiLoCo H={inner} stateless" for inner in (50, 100)]
    assert list(results) == ["synchronous", *expected]
    for method in expected:
        diloco = results[method]
        inner = int(method.split("=")[1].split()[0])
        assert sync["bytes_sent"] == inner * diloco["bytes_sent"]
        assert diloco["steps"] == sync["steps"] == [0, 100, 200]
        assert 0 < diloco["test_loss"] < diloco["val_loss"][0]
    assert sync["test_loss"] < sync["val_loss"][0]
    assert 0 < report["bayes_test_loss"] < sync["test_loss"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot written" in completed.stdout
    else:
        assert (tmp_path / "plot.png").stat().st_size > 0
