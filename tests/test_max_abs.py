"""The screening scan: both backends give each value's largest magnitude, exactly.

The reference is NumPy's ``max(|x|)`` over the values read as float64, with NaN winning over
everything (a NaN anywhere makes a value fail screening as non-finite).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aumai_fedtrain.backend import Backend, get_backend, native_available
from tests.test_hash_parity import SETTINGS


@pytest.fixture
def backend(backend_name: str) -> Backend:
    return get_backend(backend_name)


def reference(value: Any) -> float:
    array = np.asarray(value, dtype=np.float64)
    if array.size == 0:
        return 0.0
    if np.isnan(array).any():
        return math.nan
    return float(np.abs(array).max())


def same(actual: list[list[float]], expected: list[list[float]]) -> bool:
    """Equal lists of floats, NaN equal to NaN, -0.0 not equal to 0.0."""
    return [[np.float64(x).tobytes() if x == x else b"nan" for x in row] for row in actual] == [
        [np.float64(x).tobytes() if x == x else b"nan" for x in row] for row in expected
    ]


scanned = st.one_of(
    hnp.arrays(
        st.sampled_from([np.float64, np.float32, np.float16, np.int64, np.uint64, np.int8]),
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
    ),
    st.lists(st.floats(), max_size=6),
    st.floats(),
)


@SETTINGS
@given(maps=st.lists(st.dictionaries(st.text(max_size=3), scanned, max_size=4), max_size=4))
def test_largest_magnitude_of_every_value_of_every_map(
    backend: Backend, maps: list[dict[str, Any]]
) -> None:
    # Execute
    result = backend.max_abs(maps)

    # Assert
    assert same(result, [[reference(value) for value in m.values()] for m in maps])


def test_nan_infinity_signed_zero_and_empty(backend: Backend) -> None:
    # Prepare
    maps = [
        {"nan_after_inf": [np.inf, np.nan], "neg_inf": [-np.inf, 1.0], "neg_zero": [-0.0]},
        {"empty": np.zeros((2, 0)), "tiny": [5e-324, -1e-310], "huge": [-1.7976931348623157e308]},
        {"f32_nan": np.array([np.nan, 1.0], dtype=np.float32), "i64_min": np.array([-(2**63)])},
    ]

    # Execute
    result = backend.max_abs(maps)

    # Assert
    assert same(
        result,
        [[math.nan, math.inf, 0.0], [0.0, 1e-310, 1.7976931348623157e308], [math.nan, 2.0**63]],
    )


@pytest.mark.skipif(not native_available(), reason="the native extension is not built")
def test_a_large_round_is_scanned_alike_on_both_backends() -> None:
    # Prepare: enough values for the native scan to split arrays across threads; the
    # extreme values in different pieces of them.
    rng = np.random.default_rng(2)
    maps = [{"w": rng.standard_normal(400_000), "b": rng.standard_normal(100)} for _ in range(8)]
    maps[3]["w"][-1] = -1e6
    maps[5]["w"][200_001] = np.nan
    maps[6]["b"][0] = np.inf

    # Execute
    native = get_backend("native").max_abs(maps)
    python = get_backend("python").max_abs(maps)

    # Assert
    assert same(native, python)
    assert native[3][0] == 1e6 and math.isnan(native[5][0]) and native[6][1] == math.inf


@pytest.mark.parametrize(
    ("maps", "error", "match"),
    [
        ([{"w": "x"}], TypeError, "'w'"),
        ([{"w": [[1.0], [1.0, 2.0]]}], ValueError, "'w'"),
        ([{3: [1.0]}], TypeError, "keys must be str"),
        ([[1.0]], TypeError, "mapping"),
    ],
    ids=["string", "ragged", "int_key", "not_a_mapping"],
)
def test_bad_input_is_an_error(
    backend: Backend, maps: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        backend.max_abs(maps)
