"""The running weighted sum: folding in any split equals one ``weighted_average``, bit for bit.

``WeightedSum.fold`` adds batches of updates to one float64 accumulator per key and
``finish`` divides and rounds once; on both backends the result must be exactly
``weighted_average`` over the concatenation of everything folded, in fold order (same keys in
the same order, same dtypes, same bytes), and the two backends must agree with each other.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aumai_fedtrain.backend import Backend, get_backend, native_available
from tests.test_average_parity import SETTINGS, assert_same_average, federations

Federation = tuple[list[dict[str, Any]], list[float]]


@pytest.fixture
def backend(backend_name: str) -> Backend:
    """Each test runs once per backend (``backend_name`` comes from conftest)."""
    return get_backend(backend_name)


@st.composite
def split_federations(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[float], list[int]]:
    """A federation whose every node counts (weights >= 1) and cut points into fold calls
    (empty calls included)."""
    updates, weights = draw(federations())
    cuts = sorted(draw(st.lists(st.integers(0, len(updates)), max_size=4)))
    return updates, [1.0 + w for w in weights], cuts


def folded(
    backend: Backend, updates: list[dict[str, Any]], weights: list[float], cuts: list[int]
) -> dict[str, np.ndarray]:
    """Fold ``updates`` in the calls that ``cuts`` delimit, then finish."""
    total = backend.WeightedSum()
    bounds = [0, *cuts, len(updates)]
    for start, end in itertools.pairwise(bounds):
        labels = [f"node-{i}" for i in range(start, end)]
        total.fold(updates[start:end], weights[start:end], labels)
    return total.finish()


@SETTINGS
@given(federation=split_federations())
def test_folding_in_any_split_equals_one_weighted_average(
    backend: Backend, federation: tuple[list[dict[str, Any]], list[float], list[int]]
) -> None:
    # Prepare
    updates, weights, cuts = federation

    # Execute
    running = folded(backend, updates, weights, cuts)

    # Assert
    assert_same_average(running, backend.weighted_average(updates, weights))


@pytest.mark.skipif(not native_available(), reason="the native extension is not built")
@SETTINGS
@given(federation=split_federations())
def test_native_and_python_running_sums_give_the_same_bytes(
    federation: tuple[list[dict[str, Any]], list[float], list[int]],
) -> None:
    updates, weights, cuts = federation
    native = folded(get_backend("native"), updates, weights, cuts)
    python = folded(get_backend("python"), updates, weights, cuts)
    assert_same_average(native, python)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_large_folds_across_threads_match_one_average(backend: Backend, dtype: type) -> None:
    # Keys of several cache blocks carried by enough nodes for the native core to thread,
    # folded one node, three nodes and the rest at a time.
    rng = np.random.default_rng(7)
    nodes = 9
    updates = [
        {
            "w": rng.standard_normal(150_001).astype(dtype),
            "b": rng.standard_normal((3, 7)).astype(np.float32 if n % 2 else np.float64),
        }
        for n in range(nodes)
    ]
    weights = [float(n % 4 + 1) for n in range(nodes)]
    expected = backend.weighted_average(updates, weights)
    assert expected["w"].dtype == dtype
    assert_same_average(folded(backend, updates, weights, [1, 4]), expected)


def test_a_shape_that_differs_from_an_earlier_fold_names_the_key_and_both_nodes(
    backend: Backend,
) -> None:
    total = backend.WeightedSum()
    total.fold([{"w": np.zeros(2)}], [1.0], ["node-a"])
    with pytest.raises(ValueError) as caught:
        total.fold([{"w": np.ones(3)}], [1.0], ["node-b"])
    assert str(caught.value) == (
        "gradient 'w': shape (3,) from node-b does not match shape (2,) from node-a"
    )


def test_a_failed_fold_adds_nothing(backend: Backend) -> None:
    total = backend.WeightedSum()
    total.fold([{"w": np.array([1.0, 2.0])}], [1.0], ["a"])
    with pytest.raises(ValueError, match="from b does not match"):
        total.fold(
            [{"w": np.array([5.0, 5.0]), "v": np.ones(1)}, {"w": np.ones(1)}],
            [1.0, 1.0],
            ["c", "b"],
        )
    not_a_weight: Any = "2"
    with pytest.raises(TypeError, match="weight #2"):
        total.fold([{"w": np.ones(2)}, {"w": np.ones(2)}], [1.0, not_a_weight])
    total.fold([{"w": np.array([3.0, 4.0])}], [3.0], ["d"])
    result = total.finish()
    assert list(result) == ["w"]
    assert result["w"].tolist() == [2.5, 3.5]


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([-1.0], r"weight #1 is -1\.0"),
        ([float("nan")], "weight #1 is nan"),
        ([1.0, 1.0], "got 2 weights for 1 updates"),
        ([1.7e308], "overflows"),
    ],
)
def test_weight_errors_number_weights_across_folds(
    backend: Backend, weights: list[float], match: str
) -> None:
    total = backend.WeightedSum()
    total.fold([{"w": np.ones(1)}], [1e308], ["a"])
    with pytest.raises(ValueError, match=match):
        total.fold([{"w": np.ones(1)}], weights, ["b"])


def test_all_zero_weights_for_a_key_are_named_at_finish(backend: Backend) -> None:
    total = backend.WeightedSum()
    total.fold([{"w": np.ones(1)}], [0.0], ["a"])
    total.fold([{"v": np.ones(1)}], [1.0], ["b"])
    with pytest.raises(ValueError, match=r"gradient 'w': all weights .* are zero"):
        total.finish()


def test_finish_needs_a_fold_and_ends_the_sum(backend: Backend) -> None:
    total = backend.WeightedSum()
    total.fold([], [])
    with pytest.raises(ValueError, match=r"Cannot average an empty list of updates\."):
        total.finish()
    total.fold([{"w": [1.0, 2.0], "e": []}], [2.0])
    result = total.finish()
    assert list(result) == ["w", "e"]
    assert result["e"].dtype == np.float64 and result["e"].shape == (0,)
    with pytest.raises(RuntimeError, match="finished"):
        total.finish()
    with pytest.raises(RuntimeError, match="finished"):
        total.fold([{"w": [1.0, 2.0]}], [1.0])
