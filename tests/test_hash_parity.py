"""Hash parity: both backends give exactly ``sha256(json.dumps(plain(g), sort_keys=True))``.

The reference digest is computed here with the standard library, so these tests pin the
contract itself, not one implementation of it.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aumai_fedtrain import HashVerifier, LocalUpdate
from aumai_fedtrain.backend import Backend, get_backend

# float32 casts of huge doubles overflow to inf, as intended.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def backend(backend_name: str) -> Backend:
    """Each test runs once per backend (``backend_name`` comes from conftest)."""
    return get_backend(backend_name)


def reference_hash(gradients: Mapping[str, Any]) -> str:
    """The contract's definition: arrays and NumPy scalars become ``.tolist()``."""
    plain = {
        key: value.tolist() if isinstance(value, np.ndarray | np.generic) else value
        for key, value in gradients.items()
    }
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode("utf-8")).hexdigest()


def _neighbours(value: float) -> list[float]:
    return [float(np.nextafter(value, -np.inf)), value, float(np.nextafter(value, np.inf))]


# Values where float formatting changes notation, rounds on a tie, or hits a limit.
BOUNDARY_FLOATS = [
    *_neighbours(1e-4),
    *_neighbours(1e-5),
    *_neighbours(1e16),
    *_neighbours(1e15),
    *_neighbours(2.2250738585072014e-308),
    5e-324,
    -5e-324,
    1.7976931348623157e308,
    -1.7976931348623157e308,
    0.0,
    -0.0,
    0.1,
    0.30000000000000004,
    9999999999999998.0,
    123456789.0,
    1823352145355240.2,  # exact value ends in ...240.25: a tie, broken to the even digit
    1.5e300,
    1e22,
    1e23,
    float("nan"),
    float("inf"),
    float("-inf"),
]

floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e-3, max_value=1e-3),
    st.floats(min_value=1e15, max_value=1e17),
    st.floats(min_value=0.0, max_value=2.2250738585072014e-308),
    st.sampled_from(BOUNDARY_FLOATS),
)
ints = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64),
    st.integers(min_value=-(2**200), max_value=2**200),
)
numbers = st.one_of(floats, ints)
nested_lists = st.recursive(
    st.lists(numbers, max_size=6),
    lambda children: st.one_of(
        st.lists(children | numbers, max_size=4),
        st.lists(children | numbers, max_size=4).map(tuple),
    ),
    max_leaves=30,
)
NUMERIC_DTYPES = [
    np.float64,
    np.float32,
    np.float16,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
]


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    """Arrays of every numeric dtype, in C order or viewed through a strided layout."""
    dtype = draw(st.sampled_from(NUMERIC_DTYPES))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
    array = draw(hnp.arrays(dtype, shape))
    layout = draw(st.sampled_from(["c", "transposed", "reversed", "strided", "fortran", "swapped"]))
    if layout == "transposed":
        return array.T
    if layout == "reversed" and array.ndim:
        return array[::-1]
    if layout == "strided" and array.ndim:
        return array[::2]
    if layout == "fortran":
        return np.asfortranarray(array)
    if layout == "swapped":
        return array.astype(array.dtype.newbyteorder())
    return array


numpy_scalars = st.one_of(
    floats.map(np.float64),
    floats.map(np.float32),
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(np.int64),
    st.integers(min_value=0, max_value=2**64 - 1).map(np.uint64),
)
values = st.one_of(numbers, nested_lists, arrays(), numpy_scalars)
keys = st.text(
    alphabet=st.one_of(
        st.characters(),
        st.characters(categories=["Cs"]),  # lone surrogates
        st.sampled_from('"\\/\n\r\t\b\f\x00\x1f\x7f\x80\u2028\ufeff\U0001f600'),
    ),
    max_size=8,
)
gradient_maps = st.dictionaries(keys, values, max_size=6)


@SETTINGS
@given(gradients=gradient_maps)
def test_hash_of_any_gradient_map_equals_json_dumps_reference(
    backend: Backend, gradients: dict[str, Any]
) -> None:
    # Prepare
    expected = reference_hash(gradients)

    # Execute
    digest = backend.canonical_hash(gradients)

    # Assert
    assert digest == expected


@SETTINGS
@given(value=floats)
def test_every_float_is_written_as_float_repr(backend: Backend, value: float) -> None:
    # Prepare
    gradients = {"x": value, "v": [value, -value], "a": np.array([value])}

    # Execute
    digest = backend.canonical_hash(gradients)

    # Assert
    assert digest == reference_hash(gradients)


@pytest.mark.parametrize("value", BOUNDARY_FLOATS, ids=repr)
def test_notation_boundaries_and_limits(backend: Backend, value: float) -> None:
    # Prepare
    gradients = {"x": value, "f32": np.float32(value), "list": [value] * 3}

    # Execute
    digest = backend.canonical_hash(gradients)

    # Assert
    assert digest == reference_hash(gradients)


@pytest.mark.parametrize(
    "value",
    [0, -1, 2**63 - 1, -(2**63), 2**63, 2**64 - 1, 2**64, -(2**64) - 1, 10**100, -(7**300)],
)
def test_ints_of_any_size_are_written_exactly(backend: Backend, value: int) -> None:
    # Prepare
    gradients = {"scalar": value, "list": [value, 1.5, [value]]}

    # Execute
    digest = backend.canonical_hash(gradients)

    # Assert
    assert digest == reference_hash(gradients)


def test_every_float16_is_written_as_the_double_it_widens_to(backend: Backend) -> None:
    # Prepare: all 65,536 bit patterns (zeros, subnormals, normals, infinities, NaNs), read in
    # place and through a big-endian copy, and a float32 of the same values
    halves = np.arange(2**16, dtype=np.uint16).view(np.float16)
    gradients = {"h": halves, "big_endian": halves.astype(">f2"), "f32": halves.astype(np.float32)}

    # Execute
    digest = backend.canonical_hash(gradients)

    # Assert: json.dumps of .tolist(), the widened doubles
    assert digest == reference_hash(gradients)
    assert digest == backend.canonical_hash({key: halves.tolist() for key in gradients})


def test_integer_arrays_of_every_width_are_written_as_ints(backend: Backend) -> None:
    # Prepare
    gradients = {
        np.dtype(dtype).name: np.array([np.iinfo(dtype).min, 0, np.iinfo(dtype).max], dtype=dtype)
        for dtype in NUMERIC_DTYPES
        if np.issubdtype(dtype, np.integer)
    }

    # Execute
    digest = backend.canonical_hash(gradients)

    # Assert
    assert digest == reference_hash(gradients)


def test_non_contiguous_and_unusual_layouts(backend: Backend) -> None:
    # Prepare
    base = np.arange(24, dtype=np.float64).reshape(2, 3, 4) / 7.0
    unaligned = np.frombuffer(b"\x00" + base.tobytes(), dtype=np.float64, count=24, offset=1)
    gradients = {
        "transposed": base.transpose(2, 0, 1),
        "negative_strides": base[::-1, :, ::-2],
        "fortran": np.asfortranarray(base),
        "big_endian": base.astype(">f8"),
        "unaligned": unaligned,
        "broadcast": np.broadcast_to(np.float32(0.1), (2, 3)),
        "zero_d": np.array(2.5),
        "float32_view": base.astype(np.float32)[:, 1:, ::3],
    }

    # Execute
    digest = backend.canonical_hash(gradients)

    # Assert
    assert digest == reference_hash(gradients)


@pytest.mark.parametrize("as_list", [False, True], ids=["array", "list"])
def test_large_inputs_stream_in_chunks(backend: Backend, as_list: bool) -> None:
    # Prepare: enough values for the native writer to write many blocks on every thread.
    values = np.random.default_rng(7).standard_normal(100_000) * 1e-3
    gradients = {"w": values.tolist() if as_list else values, "b": np.float32(-0.5)}

    # Execute
    digest = backend.canonical_hash(gradients)

    # Assert
    assert digest == reference_hash(gradients)


def test_large_maps_of_every_shape_are_hashed_in_order(backend: Backend) -> None:
    # Prepare: enough numbers for the native core to write blocks of 4,096 numbers on every
    # thread; N-D arrays whose rows and blocks the block boundaries cut anywhere, empty
    # arrays between them, ints, float32 and a ragged list in the same map.
    rng = np.random.default_rng(17)
    gradients = {
        "a.weight": rng.standard_normal((37, 29, 41)) * 10.0 ** rng.integers(-9, 9, (37, 29, 41)),
        "b.empty": np.zeros((3, 0)),
        "c.counts": rng.integers(-(2**63), 2**63 - 1, (4097,), dtype=np.int64),
        "d.half": rng.standard_normal((129, 65)).astype(np.float32),
        "e.ragged": [[0.5, 1], [], [[2.0]], 3, 2**70, *rng.standard_normal(9000).tolist()],
        "f.scalar": np.float64(0.1),
    }

    # Execute
    digest = backend.canonical_hash(gradients)

    # Assert
    assert digest == reference_hash(gradients)


@SETTINGS
@given(maps=st.lists(gradient_maps, max_size=5))
def test_many_maps_hash_each_as_alone(backend: Backend, maps: list[dict[str, Any]]) -> None:
    # Execute
    digests = backend.canonical_hashes(maps)

    # Assert
    assert digests == [reference_hash(gradients) for gradients in maps]


def test_many_large_maps_are_hashed_side_by_side(backend: Backend) -> None:
    # Prepare: one update per node, enough of them and of numbers for the native core to
    # hash the maps on every thread at once.
    rng = np.random.default_rng(23)
    maps = [{"w": rng.standard_normal(6000), "b": rng.standard_normal(10)} for _ in range(12)]

    # Execute
    digests = backend.canonical_hashes(maps)

    # Assert
    assert digests == [reference_hash(gradients) for gradients in maps]


def test_many_maps_name_the_key_of_the_first_bad_value(backend: Backend) -> None:
    with pytest.raises(TypeError, match="'bad'"):
        backend.canonical_hashes([{"w": [1.0]}, {"bad": "1.0"}])


@pytest.mark.parametrize(
    "key",
    [
        "",
        'quote"backslash\\slash/',
        "\n\r\t\b\f\x00\x01\x1f\x7f",
        "caf\u00e9 \u4e2d\u6587 \u2028",
        "emoji \U0001f600 \U0010ffff",
        "lone \ud800 surrogate \udfff",
        "x" * 70_000,
    ],
    ids=["empty", "quotes", "controls", "unicode", "non_bmp", "lone_surrogates", "long"],
)
def test_keys_are_escaped_like_ensure_ascii(backend: Backend, key: str) -> None:
    # Prepare
    gradients = {key: 1.0, "plain": [1, 2]}

    # Execute
    digest = backend.canonical_hash(gradients)

    # Assert
    assert digest == reference_hash(gradients)


def test_keys_are_sorted_by_code_point_not_utf16(backend: Backend) -> None:
    # Prepare: U+FF5E sorts before U+1F600 by code point but after it in UTF-16 order.
    gradients = {"\U0001f600": 1, "\uff5e": 2, "B": 3, "a": 4, "\ud800": 5}

    # Execute
    digest = backend.canonical_hash(gradients)

    # Assert
    assert digest == reference_hash(gradients)


@pytest.mark.parametrize(
    "gradients",
    [{}, {"empty": []}, {"nested_empty": [[], [[]]]}, {"empty_array": np.zeros((2, 0))}],
    ids=["empty_map", "empty_list", "nested_empty", "empty_array"],
)
def test_empty_maps_and_empty_vectors(backend: Backend, gradients: dict[str, Any]) -> None:
    # Prepare
    expected = reference_hash(gradients)

    # Execute
    digest = backend.canonical_hash(gradients)

    # Assert
    assert digest == expected


class _Gradients(Mapping[str, Any]):
    """A mapping that is not a dict."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def test_any_mapping_is_accepted(backend: Backend) -> None:
    # Prepare
    data = {"b": [1.0, 2.0], "a": np.arange(3.0)}

    # Execute
    custom = backend.canonical_hash(_Gradients(data))
    proxy = backend.canonical_hash(MappingProxyType(data))

    # Assert
    assert custom == proxy == reference_hash(data)


def test_hashing_from_many_threads_gives_one_digest(backend: Backend) -> None:
    # Prepare
    gradients = {"w": np.random.default_rng(3).standard_normal(50_000), "b": [0.5] * 100}
    digests: list[str] = []

    def work() -> None:
        digests.append(backend.canonical_hash(gradients))

    threads = [threading.Thread(target=work) for _ in range(4)]

    # Execute
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Assert
    assert digests == [reference_hash(gradients)] * 4


@pytest.mark.parametrize(
    ("gradients", "named"),
    [
        ({"w": "0.5"}, "'w'"),
        ({"w": None}, "'w'"),
        ({"w": True}, "'w'"),
        ({"w": np.bool_(True)}, "'w'"),
        ({"w": [1.0, "x"]}, "'w'"),
        ({"w": [1.0, [2.0, None]]}, "'w'"),
        ({"w": [1.0, False]}, "'w'"),
        ({"w": [np.array([1.0])]}, "'w'"),
        ({"w": np.array([True, False])}, "'w'"),
        ({"w": np.array([1 + 2j])}, "'w'"),
        ({"w": np.array([1.0], dtype=object)}, "'w'"),
        ({"w": {"nested": 1.0}}, "'w'"),
        ({1: 1.0}, "1"),
        ({("a",): 1.0}, "('a',)"),
    ],
    ids=[
        "str_value",
        "none",
        "bool",
        "numpy_bool",
        "str_in_list",
        "none_nested",
        "bool_in_list",
        "array_in_list",
        "bool_array",
        "complex_array",
        "object_array",
        "dict_value",
        "int_key",
        "tuple_key",
    ],
)
def test_bad_input_is_a_type_error_naming_the_key(
    backend: Backend, gradients: dict[Any, Any], named: str
) -> None:
    # Execute / Assert
    with pytest.raises(TypeError) as error:
        backend.canonical_hash(gradients)
    assert named in str(error.value)


class _Tagged(np.ndarray):
    """A trivial ndarray subclass."""


# NumPy array subclasses, which both hot paths refuse on both backends (makers, so that each
# test builds its own).
ARRAY_SUBCLASSES = [
    pytest.param(lambda: np.ma.masked_array([1.0, 2.0], mask=[False, True]), id="masked"),
    pytest.param(
        lambda: np.matrix([[1.0, 2.0]]),
        id="matrix",
        marks=pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning"),
    ),
    pytest.param(lambda: np.array([1.0, 2.0]).view(_Tagged), id="custom"),
]


@pytest.mark.parametrize("make", ARRAY_SUBCLASSES)
def test_numpy_array_subclasses_are_type_errors_naming_the_key(
    backend: Backend, make: Callable[[], np.ndarray]
) -> None:
    # Execute / Assert: `.tolist()` of a masked array writes None for masked values.
    with pytest.raises(TypeError, match="subclass") as error:
        backend.canonical_hash({"w": make(), "b": [1.0]})
    assert "'w'" in str(error.value)


@pytest.mark.parametrize("gradients", [[("w", 1.0)], "w", None, 1.0], ids=repr)
def test_non_mapping_is_a_type_error(backend: Backend, gradients: Any) -> None:
    # Execute / Assert
    with pytest.raises(TypeError, match="mapping"):
        backend.canonical_hash(gradients)


@pytest.mark.parametrize(
    "value",
    [np.array([1.5], dtype=np.longdouble), np.longdouble(1.5)],
    ids=["array", "scalar"],
)
def test_long_double_is_rejected_as_json_does(backend: Backend, value: Any) -> None:
    # Prepare: `.tolist()` keeps NumPy long doubles, which json.dumps cannot serialise.
    if np.dtype(np.longdouble).itemsize == 8:
        pytest.skip("long double is float64 on this platform")
    gradients = {"w": value}

    # Execute / Assert
    with pytest.raises(TypeError):
        backend.canonical_hash(gradients)


def test_absurdly_deep_nesting_is_a_recursion_error_not_a_crash(backend: Backend) -> None:
    # Prepare
    deep: Any = 1.0
    for _ in range(100_000):
        deep = [deep]

    # Execute / Assert
    with pytest.raises(RecursionError):
        backend.canonical_hash({"w": deep})


def test_the_verifier_checks_many_updates_at_once(backend_name: str) -> None:
    # Prepare: one update per node, one of them tampered with after it was hashed.
    rng = np.random.default_rng(29)
    updates = [
        LocalUpdate(
            node_id=f"node-{i}",
            round_id=1,
            gradients={"w": rng.standard_normal(3000)},
            loss=0.5,
            samples_used=10,
        )
        for i in range(6)
    ]
    verifier = HashVerifier(backend_name)
    digests = [reference_hash(update.gradients) for update in updates]
    updates[4].gradients["w"][7] += 1e-12

    # Execute
    verdicts = verifier.verify_all(updates, [digest.upper() for digest in digests])

    # Assert
    assert verdicts == [True, True, True, True, False, True]
    assert verifier.compute_hashes([u.gradients for u in updates[:2]]) == digests[:2]
    with pytest.raises(ValueError, match="5 hashes for 6 updates"):
        verifier.verify_all(updates, digests[:5])
    with pytest.raises(ValueError, match="not a SHA-256"):
        verifier.verify_all(updates[:1], ["xyz"])
