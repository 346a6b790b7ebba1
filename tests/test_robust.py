"""Robust aggregation rules: what each computes, bit-exact parity of the native and NumPy
kernels (hypothesis), and the errors for too few nodes and non-finite input."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aumai_fedtrain import robust
from aumai_fedtrain.aggregation import average_updates
from aumai_fedtrain.backend import get_backend, native_available
from aumai_fedtrain.checkpoint import Checkpoint, checkpoint_lock, load_checkpoint, save_checkpoint
from aumai_fedtrain.coordinator import DiLoCoCoordinator
from aumai_fedtrain.models import (
    AggregationConfig,
    AggregationRule,
    FederatedNode,
    GlobalState,
    LocalUpdate,
    TrainingConfig,
)
from tests.helpers import run_cli

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
needs_native = pytest.mark.skipif(
    not native_available(), reason="the native extension is not built"
)
Maps = list[dict[str, np.ndarray]]

# A small pool of values makes ties (and +0.0 / -0.0 pairs) common.
POOL = [-0.0, 0.0, 1.0, -1.0, 0.5, 2.5, -3.75, 1e-300, 7e8, -0.1]
values = st.one_of(
    st.sampled_from(POOL), st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
)


@st.composite
def update_sets(draw: st.DrawFn, min_count: int = 1, max_count: int = 9) -> Maps:
    """``N`` gradient maps with the same keys and shapes, float64 or float32 per array."""
    count = draw(st.integers(min_count, max_count))
    shapes = draw(
        st.lists(
            st.lists(st.integers(0, 4), min_size=0, max_size=2).map(tuple), min_size=1, max_size=3
        )
    )
    maps: Maps = []
    for _ in range(count):
        update = {}
        for index, shape in enumerate(shapes):
            size = math.prod(shape)
            flat = draw(st.lists(values, min_size=size, max_size=size))
            dtype = draw(st.sampled_from([np.float64, np.float32]))
            update[f"k{index}"] = np.array(flat, dtype=np.float64).astype(dtype).reshape(shape)
        maps.append(update)
    return maps


def assert_same_bits(left: Mapping[str, np.ndarray], right: Mapping[str, np.ndarray]) -> None:
    assert list(left) == list(right)
    for key in left:
        assert left[key].dtype == right[key].dtype
        assert left[key].shape == right[key].shape, key
        assert left[key].tobytes() == right[key].tobytes(), key


def both(rule: str, updates: Sequence[Mapping[str, np.ndarray]], **params: object) -> None:
    """The rule on both backends: the same bits."""
    function = getattr(robust, rule)
    native = function(updates, **params, backend="native")
    assert_same_bits(native, function(updates, **params, backend="python"))
    for key, value in native.items():  # the carriers' widest float type, as the mean's
        assert value.dtype == np.result_type(*(update[key] for update in updates)), key


# --- parity of every rule on both backends ----------------------------------------------------


@needs_native
@SETTINGS
@given(updates=update_sets())
def test_median_is_bit_exact_on_both_backends(updates: Maps) -> None:
    both("median", updates)


@needs_native
@SETTINGS
@given(updates=update_sets(), fraction=st.floats(0, 0.49))
def test_trimmed_mean_is_bit_exact_on_both_backends(updates: Maps, fraction: float) -> None:
    both("trimmed_mean", updates, trim_fraction=fraction)


@needs_native
@SETTINGS
@given(updates=update_sets(min_count=3), data=st.data())
def test_krum_is_bit_exact_on_both_backends(updates: Maps, data: st.DataObject) -> None:
    f = data.draw(st.integers(0, len(updates) - 3))
    m = data.draw(st.one_of(st.none(), st.integers(1, len(updates) - f)))
    both("krum", updates, f=f, m=m)


@needs_native
@SETTINGS
@given(
    updates=update_sets(),
    tau=st.one_of(st.none(), st.floats(1e-3, 1e3)),
    iterations=st.integers(1, 4),
)
def test_centered_clip_is_bit_exact_on_both_backends(
    updates: Maps, tau: float | None, iterations: int
) -> None:
    both("centered_clip", updates, tau=tau, iterations=iterations)


@needs_native
@SETTINGS
@given(updates=update_sets(), data=st.data())
def test_centered_clip_from_a_start_with_a_radius_multiple_is_bit_exact_on_both_backends(
    updates: Maps, data: st.DataObject
) -> None:
    start = data.draw(st.one_of(st.none(), st.sampled_from(updates)))
    multiple = data.draw(st.floats(0.05, 4.0))
    both("centered_clip", updates, radius_multiple=multiple, start=start)


@needs_native
@SETTINGS
@given(updates=update_sets(), size=st.integers(1, 4), seed=st.integers(-5, 5), data=st.data())
def test_bucket_means_and_bucketed_rules_are_bit_exact_on_both_backends(
    updates: Maps, size: int, seed: int, data: st.DataObject
) -> None:
    native = robust.bucket_means(updates, size, seed, 2, backend="native")
    python = robust.bucket_means(updates, size, seed, 2, backend="python")
    assert len(native) == len(python) == robust.bucket_count(len(updates), size)
    for left, right in zip(native, python, strict=True):
        assert_same_bits(left, right)
    rules: list[AggregationRule] = ["median", "trimmed_mean", "centered_clip"]
    rule = data.draw(st.sampled_from(rules))
    config = AggregationConfig(rule=rule, bucket_size=size)
    local = [
        LocalUpdate(node_id=f"n{i}", round_id=2, gradients=u, loss=1.0, samples_used=1)
        for i, u in enumerate(updates)
    ]
    weights = [1.0] * len(local)
    left = robust.aggregate(local, config, weights, "native", seed=seed)
    assert_same_bits(left, robust.aggregate(local, config, weights, "python", seed=seed))
    for key, value in left.items():  # bucketing keeps the carriers' float type
        assert value.dtype == np.result_type(*(update[key] for update in updates)), key


@needs_native
@SETTINGS
@given(updates=update_sets(), multiple=st.floats(0.1, 3.0))
def test_norm_clipping_is_bit_exact_on_both_backends(updates: Maps, multiple: float) -> None:
    native = robust.clip_norms(updates, multiple, backend="native")
    python = robust.clip_norms(updates, multiple, backend="python")
    for left, right in zip(native, python, strict=True):
        assert [v.tobytes() for v in left.values()] == [v.tobytes() for v in right.values()]


@needs_native
@SETTINGS
@given(updates=update_sets())
def test_distance_kernels_are_bit_exact(updates: Maps) -> None:
    native = robust.kernels(get_backend("native"))
    python = robust.kernels(get_backend("python"))
    assert native.squared_distances(updates) == python.squared_distances(updates)
    center = updates[-1]
    assert native.squared_distances(updates, center) == python.squared_distances(updates, center)
    assert native.pairwise_squared_distances(updates) == python.pairwise_squared_distances(updates)


@needs_native
@pytest.mark.parametrize("count", [8, 16])
def test_threaded_inputs_are_bit_exact(count: int) -> None:
    # Enough values for the native core to split keys across threads (rust/parallel.rs).
    rng = np.random.default_rng(count)
    updates = [{"w": rng.normal(size=(300, 500)), "b": rng.normal(size=1001)} for _ in range(count)]
    updates[0]["w"][:] = 1e6  # one far-off update
    cases: list[tuple[str, dict[str, float]]] = [
        ("median", {}),
        ("trimmed_mean", {"trim_fraction": 0.2}),
        ("krum", {"f": 2}),
        ("centered_clip", {}),
    ]
    for rule, params in cases:
        both(rule, updates, **params)


# --- what each rule computes ---------------------------------------------------------------------


def test_median_is_numpys_median_and_reads_signed_zero_as_zero(backend_name: str) -> None:
    rng = np.random.default_rng(1)
    for count in (1, 2, 5, 8):
        updates = [{"x": rng.normal(size=(4, 3))} for _ in range(count)]
        expected = np.median(np.stack([u["x"] for u in updates]), axis=0)
        np.testing.assert_array_equal(robust.median(updates, backend_name)["x"], expected)
    result = robust.median([{"x": np.array([-0.0])}], backend_name)["x"]
    assert result.tobytes() == np.array([0.0]).tobytes()


def test_trimmed_mean_drops_floor_beta_n_per_side(backend_name: str) -> None:
    updates = [{"x": np.array([value])} for value in [1.0, 2.0, 3.0, 4.0, -1e9, 1e9, 5.0]]
    # floor(0.3 * 7) = 2 per side: 1e9, 5 and -1e9, 1 go; the mean of 2, 3, 4 stays.
    assert robust.trimmed_mean(updates, 0.3, backend_name)["x"].tolist() == [3.0]
    # floor(0.1 * 7) = 0: the plain unweighted mean.
    assert robust.trimmed_mean(updates, 0.1, backend_name)["x"].tolist() == [15.0 / 7]
    assert robust.trimmed_mean(updates[:2], 0.49, backend_name)["x"].tolist() == [1.5]


def test_krum_averages_the_updates_of_the_honest_cluster(backend_name: str) -> None:
    honest = [{"x": np.array([1.0 + 0.01 * i, -1.0])} for i in range(6)]
    attackers = [{"x": np.array([100.0, 100.0])}, {"x": np.array([-50.0, 80.0])}]
    result = robust.krum(attackers + honest, f=2, backend=backend_name)["x"]
    # m = N - f = 6 selected: exactly the honest ones.
    np.testing.assert_allclose(result, [1.025, -1.0])
    single = robust.krum(attackers + honest, f=2, m=1, backend=backend_name)["x"]
    assert single.tolist() in [u["x"].tolist() for u in honest]


def test_centered_clip_bounds_the_pull_of_an_outlier(backend_name: str) -> None:
    rng = np.random.default_rng(2)
    honest = [{"x": rng.normal(size=50)} for _ in range(7)]
    outlier = {"x": honest[0]["x"] * 1e4}
    clean = robust.centered_clip(honest, backend=backend_name)["x"]
    attacked = robust.centered_clip([*honest, outlier], backend=backend_name)["x"]
    mean_shift = np.linalg.norm(np.mean([u["x"] for u in [*honest, outlier]], axis=0) - clean)
    assert np.linalg.norm(attacked - clean) < mean_shift / 100
    # With a radius larger than every distance, one step from the median is the plain mean.
    plain = robust.centered_clip(honest, tau=1e9, iterations=1, backend=backend_name)["x"]
    np.testing.assert_allclose(plain, np.mean([u["x"] for u in honest], axis=0), atol=1e-12)


def test_norm_clipping_scales_long_updates_to_the_multiple_of_the_median_norm(
    backend_name: str,
) -> None:
    updates = [{"x": np.array([3.0, 4.0]) * scale} for scale in (1.0, 1.0, 2.0, 100.0)]
    clipped = robust.clip_norms(updates, 1.5, backend_name)
    norms = [float(np.linalg.norm(u["x"])) for u in clipped]
    # The median norm is (5 + 10) / 2 = 7.5; the threshold 11.25.
    assert norms[:3] == [5.0, 5.0, 10.0]
    assert norms[3] == pytest.approx(11.25)
    assert clipped[0]["x"].tolist() == [3.0, 4.0]


# --- errors --------------------------------------------------------------------------------------


def test_centered_clip_from_a_start_steps_towards_the_updates(backend_name: str) -> None:
    updates = [{"w": np.array([x, 0.0])} for x in (1.0, 3.0, 5.0)]
    start = {"w": np.array([0.0, 0.0])}
    # A radius past every distance: one step lands on the mean, whatever the start.
    far = robust.centered_clip(updates, tau=100.0, iterations=1, backend=backend_name, start=start)
    np.testing.assert_array_equal(far["w"], [3.0, 0.0])
    # Radius 1: each update pulls by at most 1/N, so one step moves the start by exactly 1.
    near = robust.centered_clip(updates, tau=1.0, iterations=1, backend=backend_name, start=start)
    np.testing.assert_allclose(near["w"], [1.0, 0.0], rtol=0, atol=1e-15)
    from_median = robust.centered_clip(updates, tau=1.0, iterations=1, backend=backend_name)
    np.testing.assert_array_equal(from_median["w"], [3.0, 0.0])  # the median is the mean here


def test_the_default_radius_is_the_multiple_of_the_median_distance_from_the_start(
    backend_name: str,
) -> None:
    updates = [u.gradients for u in round_updates(5)]
    start = {key: value * 0.5 for key, value in updates[1].items()}
    distances = [math.sqrt(d) for d in robust.numpy_squared_distances(updates, start)]
    radius = 0.3 * sorted(distances)[2]
    assert_same_bits(
        robust.centered_clip(updates, backend=backend_name, radius_multiple=0.3, start=start),
        robust.centered_clip(updates, tau=radius, backend=backend_name, start=start),
    )
    median_start = robust.centered_clip(updates, backend=backend_name)
    assert_same_bits(
        median_start, robust.centered_clip(updates, backend=backend_name, radius_multiple=1.0)
    )


def test_buckets_are_a_partition_drawn_from_the_seed_and_round() -> None:
    first = robust.buckets(8, 3, seed=7, round_id=4)
    assert [len(bucket) for bucket in first] == [3, 3, 2]
    assert sorted(i for bucket in first for i in bucket) == list(range(8))
    assert all(bucket == sorted(bucket) for bucket in first)
    assert robust.buckets(8, 3, seed=7, round_id=4) == first  # deterministic
    others = {str(robust.buckets(8, 3, seed=7, round_id=r)) for r in range(1, 9)}
    others |= {str(robust.buckets(8, 3, seed=s, round_id=4)) for s in range(8)}
    assert len(others) > 8  # other rounds and seeds draw other buckets
    singles = robust.buckets(5, 1, seed=0, round_id=1)
    assert sorted(singles) == [[i] for i in range(5)]
    assert robust.buckets(3, 5, seed=0, round_id=1) == [[0, 1, 2]]


def test_bucket_means_average_each_bucket(backend_name: str) -> None:
    updates = [u.gradients for u in round_updates(7)]
    means = robust.bucket_means(updates, 2, seed=3, round_id=5, backend=backend_name)
    for bucket, mean in zip(robust.buckets(7, 2, seed=3, round_id=5), means, strict=True):
        for key in ("w", "b"):
            expected = np.mean([updates[i][key] for i in bucket], axis=0)
            np.testing.assert_allclose(mean[key], expected, rtol=1e-15, atol=1e-15)


def test_bucketing_then_the_median_of_the_bucket_means(backend_name: str) -> None:
    updates = round_updates(6)
    config = AggregationConfig(rule="median", bucket_size=2)
    result = robust.aggregate(updates, config, [1.0] * 6, backend_name, seed=11)
    means = robust.bucket_means([u.gradients for u in updates], 2, 11, 1, backend_name)
    assert_same_bits(result, robust.median(means, backend_name))
    unbucketed = robust.aggregate(updates, AggregationConfig(rule="median"), [1.0] * 6)
    assert not np.array_equal(result["w"], unbucketed["w"])


def test_new_option_values_out_of_range_are_value_errors(backend_name: str) -> None:
    updates = [u.gradients for u in round_updates(3)]
    for multiple in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match=r"^centered_clip: radius multiple .* must be"):
            robust.centered_clip(updates, radius_multiple=multiple, backend=backend_name)
    with pytest.raises(ValueError, match=r"^centered_clip: the start has keys \['w'\]"):
        robust.centered_clip(updates, start={"w": updates[0]["w"]}, backend=backend_name)
    bad_shape = {"w": updates[0]["w"], "b": np.zeros(7)}
    with pytest.raises(ValueError, match=r"^centered_clip: the start's 'b' has shape \(7,\)"):
        robust.centered_clip(updates, start=bad_shape, backend=backend_name)
    nan_start = {"w": updates[0]["w"] * np.nan, "b": updates[0]["b"]}
    with pytest.raises(ValueError, match=r"^centered_clip: the start's 'w' has non-finite"):
        robust.centered_clip(updates, start=nan_start, backend=backend_name)
    with pytest.raises(ValueError, match=r"^bucketing: bucket size 0 must be >= 1$"):
        robust.bucket_means(updates, 0, 0, 1, backend_name)
    for bad in (
        {"clip_radius_multiple": 0.0},
        {"clip_start": "mean"},
        {"bucket_size": 0},
        {"rule": "mean", "bucket_size": 2},
    ):
        with pytest.raises(ValueError, match=r"clip_radius_multiple|clip_start|bucket_size"):
            AggregationConfig.model_validate(bad)


def test_the_previous_start_needs_the_previous_aggregate_after_round_one(
    backend_name: str,
) -> None:
    config = TrainingConfig(
        num_nodes=5, aggregation=AggregationConfig(rule="centered_clip", clip_start="previous")
    )
    aggregator = robust.RobustAggregator(config, backend_name)
    first = round_updates(5)
    assert_same_bits(  # round 1 has no previous aggregate: it starts from the median
        aggregator.average(first), robust.centered_clip([u.gradients for u in first])
    )
    second = [u.model_copy(update={"round_id": 2}) for u in first]
    with pytest.raises(ValueError, match=r"^centered_clip: clip_start 'previous' needs the "):
        aggregator.average(second)
    previous = aggregator.average(first)
    assert_same_bits(
        aggregator.average(second, previous),
        robust.centered_clip([u.gradients for u in second], start=previous),
    )


def test_the_previous_aggregate_survives_a_checkpoint_bit_for_bit(
    tmp_path: Path, backend_name: str
) -> None:
    """The hook's state is ``GlobalState.global_weights``: a resumed round aggregates alike."""
    aggregation = AggregationConfig(rule="centered_clip", clip_start="previous", bucket_size=2)
    config = TrainingConfig(num_nodes=6, aggregation=aggregation, seed=5)
    updates = round_updates(6)
    float32 = [
        u.model_copy(update={"gradients": {k: v.astype(np.float32) for k, v in g.items()}})
        for u, g in ((u, u.gradients) for u in updates)
    ]
    aggregator = robust.RobustAggregator(config, backend_name, num_nodes=6)
    for batch in (updates, float32):
        state = GlobalState(round_id=1, global_weights=aggregator.average(batch))
        checkpoint = Checkpoint(
            config=config,
            node_ids=[u.node_id for u in batch],
            state=state,
            credits={},
            history=[],
            elapsed=0.0,
        )
        with checkpoint_lock(tmp_path):
            save_checkpoint(tmp_path, checkpoint)
        loaded = load_checkpoint(tmp_path)
        assert loaded is not None
        assert_same_bits(loaded.state.global_weights, state.global_weights)
        second = [u.model_copy(update={"round_id": 2}) for u in batch]
        resumed = robust.RobustAggregator(loaded.config, backend_name, num_nodes=6)
        assert_same_bits(
            resumed.average(second, loaded.state.global_weights),
            aggregator.average(second, state.global_weights),
        )


def test_krum_counts_buckets_when_the_run_starts() -> None:
    nodes = [FederatedNode(node_id=f"n{i}", address="sim://") for i in range(8)]
    bucketed = AggregationConfig(rule="krum", krum_f=1, bucket_size=2)
    DiLoCoCoordinator().initialize(TrainingConfig(num_nodes=8, aggregation=bucketed), nodes)
    too_many = bucketed.model_copy(update={"krum_f": 2})
    with pytest.raises(ValueError, match=r"^krum: N = 4 updates is too few for f = 2"):
        DiLoCoCoordinator().initialize(TrainingConfig(num_nodes=8, aggregation=too_many), nodes)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    ("rule", "params"),
    [
        ("median", {}),
        ("trimmed_mean", {"trim_fraction": 0.1}),
        ("krum", {"f": 0}),
        ("centered_clip", {}),
    ],
)
def test_non_finite_input_is_a_value_error_naming_the_rule_and_update(
    backend_name: str, rule: str, params: dict[str, object], bad: float
) -> None:
    updates = [{"w": np.ones(3)} for _ in range(4)]
    updates[2] = {"w": np.array([1.0, bad, 1.0])}
    with pytest.raises(ValueError, match=rf"^{rule}: gradient 'w' of update #2 has non-finite"):
        getattr(robust, rule)(updates, **params, backend=backend_name)


def test_krum_with_too_few_nodes_names_the_rule_n_and_f(backend_name: str) -> None:
    updates = [{"x": np.array([float(i)])} for i in range(4)]
    with pytest.raises(
        ValueError, match=r"^krum: N = 4 updates is too few for f = 2 .*N >= f \+ 3 = 5"
    ):
        robust.krum(updates, f=2, backend=backend_name)
    # f at its bound: N = f + 3 scores each update by its single nearest neighbour.
    assert robust.krum(updates, f=1, backend=backend_name)["x"].tolist() == [1.0]
    with pytest.raises(ValueError, match=r"^krum: m = 4 selected updates must be in \[1, N - f\]"):
        robust.krum(updates, f=1, m=4, backend=backend_name)


def test_trim_fraction_outside_its_range_names_the_rule_and_n(backend_name: str) -> None:
    updates = [{"x": np.array([1.0])}, {"x": np.array([2.0])}]
    with pytest.raises(
        ValueError, match=r"^trimmed_mean: trim fraction 0.5 must be in \[0, 0.5\) \(N = 2"
    ):
        robust.trimmed_mean(updates, 0.5, backend=backend_name)


def test_updates_of_different_keys_or_shapes_or_none_are_value_errors(backend_name: str) -> None:
    with pytest.raises(ValueError, match=r"^median: cannot aggregate an empty list"):
        robust.median([], backend_name)
    with pytest.raises(ValueError, match=r"^median: update #1 has keys"):
        robust.median([{"a": np.ones(2)}, {"b": np.ones(2)}], backend_name)
    with pytest.raises(ValueError, match=r"^median: gradient 'a' has shape \(3,\) in update #1"):
        robust.median([{"a": np.ones(2)}, {"a": np.ones(3)}], backend_name)


@needs_native
def test_native_kernels_check_their_own_input() -> None:
    from aumai_fedtrain import _native

    with pytest.raises(ValueError, match=r"update #1 has keys \['b'\], update #0 has \['a'\]"):
        _native.median([{"a": [1.0]}, {"b": [1.0]}])
    with pytest.raises(ValueError, match=r"cannot trim 1 values per side from 2 updates"):
        _native.trimmed_mean([{"a": [1.0]}, {"a": [2.0]}], 1)
    with pytest.raises(ValueError, match=r"gradient #0 has shape \(2,\) in update #1"):
        _native.pairwise_squared_distances([{"a": [1.0]}, {"a": [1.0, 2.0]}])
    with pytest.raises(ValueError, match=r"center has keys"):
        _native.squared_distances([{"a": [1.0]}], {"c": [1.0]})
    with pytest.raises(ValueError, match=r"^cannot aggregate an empty list of updates$"):
        _native.median([])


# --- configuration and the coordinator -----------------------------------------------------------


def test_the_aggregation_config_validates_its_fields() -> None:
    assert TrainingConfig().aggregation == AggregationConfig(rule="mean")
    config = TrainingConfig.model_validate({"aggregation": {"rule": "krum", "krum_f": 1}})
    assert (config.aggregation.rule, config.aggregation.krum_f) == ("krum", 1)
    for bad in ({"rule": "bulyan"}, {"trim_fraction": 0.5}, {"norm_clip": 0.0}, {"extra": 1}):
        with pytest.raises(ValueError, match="aggregation"):
            TrainingConfig.model_validate({"aggregation": bad})


def round_updates(count: int, size: int = 2, samples: int | None = None) -> list[LocalUpdate]:
    """``count`` random round-1 updates of nodes ``node-000``, ... (``w``: ``size x size + 1``);
    each claims ``samples``, or ``10 * (i + 1)`` by default."""
    rng = np.random.default_rng(3)
    return [
        LocalUpdate(
            node_id=f"node-{i:03d}",
            round_id=1,
            gradients={"w": rng.normal(size=(size, size + 1)), "b": rng.normal(size=size + 1)},
            loss=1.0,
            samples_used=10 * (i + 1) if samples is None else samples,
        )
        for i in range(count)
    ]


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed_mean", "centered_clip", "krum"])
def test_the_coordinator_aggregates_with_the_configured_rule(backend_name: str, rule: str) -> None:
    updates = round_updates(5)
    nodes = [FederatedNode(node_id=u.node_id, address="sim://") for u in updates]
    aggregation = AggregationConfig(rule=rule, krum_f=1)  # type: ignore[arg-type]
    config = TrainingConfig(num_nodes=5, aggregation=aggregation)
    coordinator = DiLoCoCoordinator(backend=backend_name)
    state = coordinator.run_round(coordinator.initialize(config, nodes), updates)
    gradients = [u.gradients for u in updates]
    expected = {
        "mean": lambda: average_updates(updates, backend=get_backend(backend_name)),
        "median": lambda: robust.median(gradients, backend_name),
        "trimmed_mean": lambda: robust.trimmed_mean(gradients, 0.25, backend_name),
        "centered_clip": lambda: robust.centered_clip(gradients, backend=backend_name),
        "krum": lambda: robust.krum(gradients, f=1, backend=backend_name),
    }[rule]()
    assert_same_bits(state.global_weights, expected)


def test_norm_clipping_composes_with_the_mean_and_ignores_no_rule(backend_name: str) -> None:
    updates = round_updates(4)
    updates[0] = updates[0].model_copy(
        update={"gradients": {k: v * 1e3 for k, v in updates[0].gradients.items()}}
    )
    config = AggregationConfig(norm_clip=1.0)
    weights = [float(u.samples_used) for u in updates]
    clipped = robust.aggregate(updates, config, weights, backend_name)
    unclipped = robust.aggregate(updates, AggregationConfig(), weights, backend_name)
    assert np.linalg.norm(clipped["w"]) < np.linalg.norm(unclipped["w"]) / 10


def test_krum_needs_enough_nodes_when_the_run_starts() -> None:
    nodes = [FederatedNode(node_id=f"n{i}", address="sim://") for i in range(4)]
    config = TrainingConfig(num_nodes=4, aggregation=AggregationConfig(rule="krum", krum_f=2))
    with pytest.raises(ValueError, match=r"^krum: N = 4 updates is too few for f = 2"):
        DiLoCoCoordinator().initialize(config, nodes)


def test_robust_rules_give_claimed_samples_no_influence(backend_name: str) -> None:
    updates = round_updates(5)
    heavy = [
        u.model_copy(update={"samples_used": 10**6 if i == 0 else 1}) for i, u in enumerate(updates)
    ]
    rules: list[AggregationRule] = ["median", "trimmed_mean", "centered_clip", "krum"]
    for rule in rules:
        config = AggregationConfig(rule=rule, krum_f=1)
        light = robust.aggregate(updates, config, [1.0] * 5, backend_name)
        weighted = robust.aggregate(
            heavy, config, [float(u.samples_used) for u in heavy], backend_name
        )
        assert_same_bits(light, weighted)


# --- the command line ----------------------------------------------------------------------------


def _eval_loss(*options: str) -> float:
    result = run_cli("run", "--nodes", "5", "--rounds", "2", "--json", *options)
    assert result.returncode == 0, result.stderr
    return float(json.loads(result.stdout)["eval_loss"])


def test_run_aggregates_with_the_rule_chosen_on_the_command_line() -> None:
    mean = _eval_loss()
    assert _eval_loss("--aggregation", "mean") == mean
    median = _eval_loss("--aggregation", "median")
    krum = _eval_loss("--aggregation", "krum", "--krum-f", "1", "--krum-m", "1")
    clipped = _eval_loss("--aggregation", "median", "--norm-clip", "0.5")
    bucketed = _eval_loss("--aggregation", "median", "--bucket-size", "2")
    wider = _eval_loss("--aggregation", "centered_clip", "--clip-radius-multiple", "0.25")
    assert len({mean, median, krum, clipped, bucketed, wider}) == 6


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--aggregation", "bulyan"], "Invalid value for '--aggregation'"),
        (["--aggregation", "trimmed_mean", "--trim-fraction", "0.5"], "trim_fraction"),
        (["--aggregation", "krum"], "krum: N = 3 updates is too few for f = 2"),
        (["--norm-clip", "-1"], "norm_clip"),
        (["--bucket-size", "2"], "bucket_size = 2 needs a robust rule"),
        (["--aggregation", "median", "--bucket-size", "0"], "bucket_size"),
        (["--clip-radius-multiple", "0"], "clip_radius_multiple"),
        (["--clip-start", "last"], "Invalid value for '--clip-start'"),
        (
            ["--nodes", "8", "--aggregation", "krum", "--krum-f", "2", "--bucket-size", "2"],
            "krum: N = 4 updates is too few for f = 2",
        ),
    ],
)
def test_bad_aggregation_options_exit_2_with_one_line(options: list[str], message: str) -> None:
    result = run_cli("run", "--rounds", "1", *options)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3  # click's usage lines for a bad choice


def test_the_coordinator_starts_centered_clip_from_the_previous_aggregate(tmp_path: Path) -> None:
    # Prepare
    from aumai_fedtrain.simulation import SimulationProvider, simulated_nodes

    def train(start: str, rounds: int, resume: bool = False, folder: str = "a") -> GlobalState:
        aggregation = AggregationConfig(rule="centered_clip", clip_start=start)  # type: ignore[arg-type]
        config = TrainingConfig(num_nodes=4, global_rounds=rounds, seed=5, aggregation=aggregation)
        result = DiLoCoCoordinator().run_training(
            config,
            simulated_nodes(4),
            SimulationProvider(),
            checkpoint_dir=tmp_path / folder,
            resume=resume,
        )
        assert result.final_state is not None and result.final_state.parameters is not None
        return result.final_state

    # Execute: 3 rounds from the previous aggregate, straight and resumed after round 2, and
    # 3 rounds from the median.
    straight = train("previous", 3)
    train("previous", 2, folder="b")
    resumed = train("previous", 3, resume=True, folder="b")
    median = train("median", 3, folder="c")

    # Assert: the start is used (rounds 2 and 3 differ from the median's), and it survives a
    # resume bit for bit.
    assert straight.parameters is not None and median.parameters is not None
    assert resumed.parameters is not None
    for key, values in straight.parameters.items():
        assert resumed.parameters[key].tobytes() == values.tobytes(), key
    assert any(
        not np.array_equal(values, median.parameters[key])
        for key, values in straight.parameters.items()
    )
