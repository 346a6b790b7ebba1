"""Averaging parity: both backends follow the contract's sequence of roundings bit for bit.

The contract (``_fallback.weighted_average``): per element, ``acc = 0.0``, then for each
carrier in update order ``acc = acc + (w_i * x_i)``, and the result is ``acc / W`` with ``W``
the carriers' weights summed in update order, rounded once to the carriers' widest float type
(float16, float32, else float64). The reference below writes that sequence out with NumPy;
results must have the same dtype and bytes, not merely be close. Error cases must raise the
same exception type and name the key or node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aumai_fedtrain.backend import Backend, get_backend, native_available
from tests.test_hash_parity import ARRAY_SUBCLASSES

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
EMPTY_UPDATES_MESSAGE = "Cannot average an empty list of updates."
# rust/parallel.rs PARALLEL_MIN_WORK: from this many multiply-adds on, the native core threads.
NATIVE_PARALLEL_MIN_WORK = 1 << 20


@pytest.fixture
def backend(backend_name: str) -> Backend:
    """Each test runs once per backend (``backend_name`` comes from conftest)."""
    return get_backend(backend_name)


def reference_average(
    updates: Sequence[Mapping[str, Any]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Per key, the contract's sequence over the updates with a non-empty value.

    ``acc = 0.0; acc = acc + (w_i * x_i)`` in update order, then ``acc / W`` with ``W`` summed
    in update order from ``0.0`` (not ``sum``, which compensates), rounded once to the
    carriers' widest float type (:func:`result_dtype`).
    """
    keys = list(dict.fromkeys(key for update in updates for key in update))
    result = {}
    for key in keys:
        carriers = [
            (weight, np.asarray(update[key], dtype=np.float64))
            for update, weight in zip(updates, weights, strict=True)
            if key in update and np.asarray(update[key]).size
        ]
        if not carriers:
            result[key] = np.empty(0)
            continue
        acc = np.zeros(carriers[0][1].shape)
        total = 0.0
        for weight, value in carriers:
            acc = acc + weight * value
            total = total + weight
        dtype = result_dtype(
            update[key] for update in updates if key in update and np.asarray(update[key]).size
        )
        result[key] = (acc / total).astype(dtype)
    return result


def result_dtype(values: Iterable[Any]) -> np.dtype:
    """The average's dtype: float16 when every carrier is a float16 array, float32 when they
    are float32 or float16 arrays, else float64 (lists, scalars and ints are float64)."""
    sizes = [
        value.dtype.itemsize
        if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.dtype.itemsize <= 8
        else 8
        for value in values
    ]
    return np.dtype(f"f{max(sizes)}")


def assert_same_average(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Same keys in the same order, each an array of the same dtype, shape and bytes."""
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert type(actual[key]) is np.ndarray
        assert actual[key].dtype == value.dtype, key
        assert actual[key].shape == value.shape, key
        assert actual[key].tobytes() == value.tobytes(), key


@st.composite
def node_values(draw: st.DrawFn, shape: tuple[int, ...]) -> Any:
    """One node's value of a given shape, as a float64/float32/float16/int array (float32 and
    float16 weighted up: a federation in one of them averages in it), list or scalar."""
    form = draw(
        st.sampled_from(
            [
                *("float64", "float32", "float32", ">f4", "float16", "float16", ">f2"),
                *("int32", "int64", "uint64", "strided", "list", "scalar"),
            ]
        )
    )
    elements = st.floats(min_value=-1e6, max_value=1e6, width=32)
    if form == "float64":
        return draw(hnp.arrays(np.float64, shape, elements=elements))
    if form in ("float32", ">f4"):
        return draw(hnp.arrays(np.dtype(form), shape, elements=elements))
    if form in ("float16", ">f2"):
        halves = st.floats(min_value=-65504, max_value=65504, width=16)
        return draw(hnp.arrays(np.dtype(form), shape, elements=halves))
    if form in ("int32", "int64", "uint64"):
        return draw(hnp.arrays(np.dtype(form), shape))  # the whole range: 64-bit ints round
    if form == "strided":
        wide = draw(hnp.arrays(np.float64, (*shape, 2), elements=elements))
        return wide[..., 1]
    if form == "scalar" and shape == ():
        return draw(st.one_of(elements, st.integers(-(2**60), 2**60)))
    return draw(hnp.arrays(np.float64, shape, elements=elements)).tolist()


@st.composite
def federations(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[float]]:
    """Nodes with overlapping keys (some missing, some empty) and weights positive per key."""
    key_shapes = draw(
        st.dictionaries(
            st.text(max_size=4),
            hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4),
            min_size=1,
            max_size=4,
        )
    )
    count = draw(st.integers(min_value=1, max_value=5))
    updates: list[dict[str, Any]] = [{} for _ in range(count)]
    for key, shape in key_shapes.items():
        carriers = draw(st.sets(st.integers(0, count - 1), min_size=1))
        for node in range(count):
            if node in carriers:
                updates[node][key] = draw(node_values(shape))
            elif draw(st.booleans()):
                updates[node][key] = []  # an empty value does not carry the key
    weights = [
        draw(st.one_of(st.just(0.0), st.floats(min_value=1e-3, max_value=1e4)))
        for _ in range(count)
    ]
    weights[draw(st.integers(0, count - 1))] = 1.0
    return updates, weights


@SETTINGS
@given(federation=federations())
def test_average_equals_numpy_reference(
    backend: Backend, federation: tuple[list[dict[str, Any]], list[float]]
) -> None:
    # Prepare
    updates, weights = federation
    weights = [1.0] * len(weights)  # every node counts, so no key is all-zero
    expected = reference_average(updates, weights)

    # Execute
    actual = backend.weighted_average(updates, weights)

    # Assert
    assert_same_average(actual, expected)


@SETTINGS
@given(federation=federations())
def test_zero_weights_average_or_name_the_key(
    backend: Backend, federation: tuple[list[dict[str, Any]], list[float]]
) -> None:
    # Prepare
    updates, weights = federation
    zero_keys = [
        key
        for key in dict.fromkeys(k for u in updates for k in u)
        if all(
            w == 0 for u, w in zip(updates, weights, strict=True) if np.asarray(u.get(key, [])).size
        )
        and any(np.asarray(u.get(key, [])).size for u in updates)
    ]

    # Execute / Assert
    if zero_keys:
        with pytest.raises(ValueError, match="all weights") as error:
            backend.weighted_average(updates, weights)
        assert repr(zero_keys[0]) in str(error.value)
    else:
        assert_same_average(
            backend.weighted_average(updates, weights), reference_average(updates, weights)
        )


def test_keys_in_first_appearance_order_with_empty_and_missing_keys(backend: Backend) -> None:
    # Prepare
    updates = [
        {"b": [1.0, 2.0], "empty": []},
        {"a": np.float32(3.0), "b": np.array([3.0, 4.0])},
        {"c": np.zeros((2, 0)), "a": 5},
    ]
    weights = [1.0, 3.0, 4.0]

    # Execute
    result = backend.weighted_average(updates, weights)

    # Assert
    assert list(result) == ["b", "empty", "a", "c"]
    np.testing.assert_array_equal(result["b"], [2.5, 3.5])
    assert result["a"].shape == ()
    assert result["a"] == (3.0 * 3.0 + 4.0 * 5) / 7.0
    for key in ("empty", "c"):
        assert result[key].shape == (0,)
        assert result[key].dtype == np.float64


def test_large_inputs_split_across_threads(backend: Backend) -> None:
    # Prepare: more multiply-adds than the native core's threading threshold, in odd sizes
    # (threads split the elements in blocks; the last block is short).
    rng = np.random.default_rng(11)
    updates = [
        {
            "w": rng.standard_normal((301, 499)) * 10.0 ** rng.integers(-8, 8, (301, 499)),
            "v": rng.standard_normal(70_001).astype(np.float32),
            "i": rng.integers(-(2**63), 2**63 - 1, 40_003, dtype=np.int64),
        }
        for _ in range(5)
    ]
    updates[2]["w"] = np.asfortranarray(updates[2]["w"])
    weights = [3.0, 0.1, 0.5, 2.0, 1e-3]
    work = sum(value.size for update in updates for value in update.values())
    assert work > NATIVE_PARALLEL_MIN_WORK

    # Execute
    result = backend.weighted_average(updates, weights)

    # Assert
    assert_same_average(result, reference_average(updates, weights))


def test_a_model_of_many_small_tensors_is_shared_across_threads(backend: Backend) -> None:
    # Prepare: more work than the threading threshold spread over 150 keys of a few hundred to
    # a few thousand elements (whole keys go to threads), float64 and float32 alternating by
    # node, and node counts around the kernel's fused groups of four.
    rng = np.random.default_rng(13)
    sizes = rng.integers(1, 4000, 150)
    updates = [
        {
            f"block.{k}": rng.standard_normal(int(size)).astype(
                np.float32 if n % 3 == 1 else np.float64
            )
            * 10.0 ** int(rng.integers(-6, 6))
            for k, size in enumerate(sizes)
        }
        for n in range(11)
    ]
    weights = rng.uniform(0.5, 50.0, len(updates)).tolist()
    assert sum(v.size for u in updates for v in u.values()) > NATIVE_PARALLEL_MIN_WORK

    # Execute
    result = backend.weighted_average(updates, weights)

    # Assert
    assert_same_average(result, reference_average(updates, weights))


@pytest.mark.skipif(not native_available(), reason="the native extension is not built")
@SETTINGS
@given(federation=federations())
def test_native_and_python_give_the_same_bytes(
    federation: tuple[list[dict[str, Any]], list[float]],
) -> None:
    # Prepare
    updates, weights = federation
    weights = [1.0 + w for w in weights]  # every node counts, so no key is all-zero

    # Execute
    native = get_backend("native").weighted_average(updates, weights)
    python = get_backend("python").weighted_average(updates, weights)

    # Assert
    assert_same_average(native, python)


@pytest.mark.parametrize(
    ("values", "weights"),
    [
        ([0.1], [3.0]),  # (0.0 + 3 * 0.1) / 3 == 0.10000000000000002, not 0.1
        ([1.0, 1e16, -1e16], [1.0, 1.0, 1.0]),  # another order of the sum gives 1 / 3
        ([0.1, 0.2, 0.3], [1.0, 2.0, 3.0]),  # coefficients w / W give 0.23333333333333334
        ([-0.0, -0.0], [1.0, 2.0]),  # 0.0 + -0.0 is 0.0
        ([1e308, 1e308], [2.0, 1.0]),  # the product overflows though the mean would not
    ],
    ids=["one_node", "order", "coefficients", "negative_zero", "overflowing_product"],
)
def test_average_is_the_specified_sequence_of_roundings(
    backend: Backend, values: list[float], weights: list[float]
) -> None:
    # Prepare: the sequence in plain Python floats (IEEE doubles, no fused multiply-add).
    acc = 0.0
    total = 0.0
    for weight, value in zip(weights, values, strict=True):
        acc = acc + weight * value
        total = total + weight
    expected = np.float64(acc / total)

    # Execute
    result = backend.weighted_average([{"w": value} for value in values], weights)

    # Assert
    assert result["w"].tobytes() == expected.tobytes()


@pytest.mark.parametrize(
    ("dtypes", "expected"),
    [
        (["float16", "float16"], "float16"),
        (["float32", "float32"], "float32"),
        (["float16", "float32"], "float32"),
        ([">f2", "float32"], "float32"),
        (["float32", "float64"], "float64"),
        (["float16", "int64"], "float64"),
        (["float32", "list"], "float64"),
    ],
)
def test_the_average_takes_the_widest_float_type_of_its_carriers(
    backend: Backend, dtypes: list[str], expected: str
) -> None:
    # Prepare: values every dtype holds exactly
    values = [[0.5, -2.0], [1.0, 4.0]]
    updates = [
        {"w": value if dtype == "list" else np.array(value, dtype=dtype)}
        for dtype, value in zip(dtypes, values, strict=True)
    ]

    # Execute
    result = backend.weighted_average(updates, [1.0, 3.0])

    # Assert
    assert result["w"].dtype == np.dtype(expected)
    assert result["w"].tolist() == [(0.5 + 3 * 1.0) / 4, (-2.0 + 12.0) / 4]


def test_a_16_bit_average_is_rounded_once_from_the_float64_result(backend: Backend) -> None:
    # Prepare: two neighbouring halves, 1 and 1 + 2^-10, weighted so that the float64 mean is
    # 1 + 2^-11 + 2^-29 * 2^-10: just above the midpoint. Rounded once it is 1 + 2^-10; a detour
    # through float32 would land on the midpoint and round (to even) down to 1.
    delta = 2.0**-28
    updates = [{"w": np.array([1.0], np.float16)}, {"w": np.array([1.0 + 2**-10], np.float16)}]
    weights = [1.0 - delta, 1.0 + delta]
    mean = ((1.0 - delta) * 1.0 + (1.0 + delta) * (1.0 + 2**-10)) / 2.0
    assert np.float16(np.float32(mean)) == 1.0

    # Execute
    result = backend.weighted_average(updates, weights)

    # Assert
    assert result["w"].dtype == np.float16
    assert result["w"][0] == np.float16(1.0 + 2**-10) == np.float16(mean)


def test_non_contiguous_and_unusual_layouts(backend: Backend) -> None:
    # Prepare
    base = np.arange(24, dtype=np.float64).reshape(4, 6) / 3.0
    unaligned = np.frombuffer(b"\x00" + base.tobytes(), dtype=np.float64, count=24, offset=1)
    updates = [
        {"w": base.T},
        {"w": np.asfortranarray(base.T)},
        {"w": base[::-1].T[:, ::-1].astype(">f8")},
        {"w": unaligned.reshape(4, 6).T},
        {"w": base.astype(np.float16).T},
        {"w": np.broadcast_to(np.float32(0.25), (6, 4))},
    ]
    weights = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]

    # Execute
    result = backend.weighted_average(updates, weights)

    # Assert
    assert_same_average(result, reference_average(updates, weights))


def test_non_finite_values_propagate(backend: Backend) -> None:
    # Prepare
    updates = [{"w": [np.nan, np.inf, 1.0]}, {"w": [0.0, 1.0, -np.inf]}]

    # Execute
    result = backend.weighted_average(updates, [1.0, 1.0])

    # Assert
    np.testing.assert_array_equal(result["w"], [np.nan, np.inf, -np.inf])


def test_empty_update_list_has_the_exact_message(backend: Backend) -> None:
    # Execute / Assert
    with pytest.raises(ValueError) as error:
        backend.weighted_average([], [])
    assert str(error.value) == EMPTY_UPDATES_MESSAGE


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ([1.0], "weights"),
        ([1.0, 2.0, 3.0], "weights"),
        ([1.0, -0.5], "weight #1"),
        ([float("nan"), 1.0], "weight #0"),
        ([1.0, float("inf")], "weight #1"),
        ([1e308, 1e308], "overflows"),
        ([1.7976931348623157e308, 1e292], "overflows"),
    ],
    ids=["too_few", "too_many", "negative", "nan", "inf", "large", "just_past_the_largest"],
)
def test_bad_weights_are_value_errors(backend: Backend, weights: list[float], match: str) -> None:
    # Prepare
    updates = [{"w": [1.0]}, {"w": [2.0]}]

    # Execute / Assert
    with pytest.raises(ValueError, match=match):
        backend.weighted_average(updates, weights)


@pytest.mark.parametrize(
    "weight",
    ["1.5", True, np.True_, None, 1 + 0j, Decimal("1.5"), np.array(1.0), [1.0]],
    ids=["str", "bool", "numpy_bool", "none", "complex", "decimal", "array", "list"],
)
def test_weights_that_are_not_real_numbers_are_type_errors(backend: Backend, weight: Any) -> None:
    # Execute / Assert
    with pytest.raises(TypeError, match="weight #1") as error:
        backend.weighted_average([{"w": [1.0]}, {"w": [2.0]}], [1.0, weight])
    assert "real numbers" in str(error.value)


def test_real_number_weights_of_any_type_are_accepted(backend: Backend) -> None:
    # Prepare
    weights = [2, np.float32(0.5), np.int64(3), Fraction(1, 4), np.float64(0.1)]
    updates = [{"w": [float(i), 1.0]} for i in range(len(weights))]

    # Execute
    result = backend.weighted_average(updates, weights)

    # Assert
    assert_same_average(result, reference_average(updates, [float(w) for w in weights]))


@pytest.mark.parametrize("make", ARRAY_SUBCLASSES)
def test_numpy_array_subclasses_are_type_errors_naming_the_key(
    backend: Backend, make: Callable[[], np.ndarray]
) -> None:
    # Execute / Assert: a masked array would average its hidden values.
    with pytest.raises(TypeError, match="subclass") as error:
        backend.weighted_average([{"w": [1.0, 2.0]}, {"w": make()}], [1.0, 1.0], ["a", "b"])
    assert "'w'" in str(error.value)
    assert "b" in str(error.value)


def test_label_count_mismatch_is_a_value_error(backend: Backend) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="labels"):
        backend.weighted_average([{"w": [1.0]}], [1.0], labels=["a", "b"])


@pytest.mark.parametrize(
    ("second", "first_shape", "second_shape"),
    [
        ([1.0, 2.0, 3.0], "(2,)", "(3,)"),
        ([[1.0, 2.0]], "(2,)", "(1, 2)"),
        (np.ones((2, 1)), "(2,)", "(2, 1)"),
        (4.0, "(2,)", "()"),
    ],
    ids=["longer", "extra_dim", "array", "scalar"],
)
def test_shape_mismatch_names_key_and_both_nodes(
    backend: Backend, second: Any, first_shape: str, second_shape: str
) -> None:
    # Prepare
    updates = [{"w": [1.0, 2.0]}, {"w": second}]

    # Execute / Assert
    with pytest.raises(ValueError) as error:
        backend.weighted_average(updates, [1.0, 1.0], labels=["node-a", "node-b"])
    message = str(error.value)
    for part in ("'w'", "node-a", "node-b", first_shape, second_shape):
        assert part in message


def test_all_zero_weights_name_the_key(backend: Backend) -> None:
    # Prepare
    updates = [{"w": [1.0], "v": [2.0]}, {"v": [3.0]}]

    # Execute / Assert
    with pytest.raises(ValueError, match="'w'"):
        backend.weighted_average(updates, [0.0, 1.0])


@pytest.mark.parametrize(
    "value",
    [[[1.0, 2.0], [3.0]], [[1.0], 2.0], [1.0, [2.0]], [[[1.0]], [[1.0, 2.0]]], [[], [1.0]]],
    ids=["rows", "row_then_number", "number_then_row", "deep", "empty_then_row"],
)
def test_ragged_nested_list_names_key_and_node(backend: Backend, value: Any) -> None:
    # Execute / Assert
    with pytest.raises(ValueError) as error:
        backend.weighted_average([{"w": [1.0]}, {"w": value}], [1.0, 1.0], labels=["a", "node-7"])
    assert "'w'" in str(error.value)
    assert "node-7" in str(error.value)


@pytest.mark.parametrize(
    "value",
    [
        "1.0",
        None,
        True,
        [1.0, "x"],
        [[1.0], [None]],
        [1.0, True],
        np.array([True]),
        np.array(["a"]),
        np.array([1j]),
        [np.array([1.0])],
    ],
    ids=[
        "str",
        "none",
        "bool",
        "str_in_list",
        "none_nested",
        "bool_in_list",
        "bool_array",
        "str_array",
        "complex_array",
        "array_in_list",
    ],
)
def test_non_numeric_values_are_type_errors_naming_the_key(backend: Backend, value: Any) -> None:
    # Execute / Assert
    with pytest.raises(TypeError, match="'w'"):
        backend.weighted_average([{"w": [1.0]}, {"w": value}], [1.0, 1.0], labels=["a", "b"])


def test_non_str_key_is_a_type_error_naming_the_node(backend: Backend) -> None:
    # Execute / Assert
    with pytest.raises(TypeError, match="node-b"):
        backend.weighted_average([{"w": [1.0]}, {3: [1.0]}], [1.0, 1.0], labels=["a", "node-b"])


def test_non_mapping_update_is_a_type_error_naming_the_node(backend: Backend) -> None:
    # Execute / Assert
    with pytest.raises(TypeError, match="update #1"):
        backend.weighted_average([{"w": [1.0]}, [("w", [1.0])]], [1.0, 1.0])


def test_absurdly_deep_nesting_is_a_recursion_error_not_a_crash(backend: Backend) -> None:
    # Prepare
    deep: Any = 1.0
    for _ in range(100_000):
        deep = [deep]

    # Execute / Assert
    with pytest.raises(RecursionError):
        backend.weighted_average([{"w": deep}], [1.0])
