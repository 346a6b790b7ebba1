"""The wire digest: both backends give the SHA-256 of the layout specified in ``digest.py``.

The reference below builds the layout's bytes with ``struct`` from the specification (not from
either backend), so these tests pin the layout itself.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aumai_fedtrain import digest
from aumai_fedtrain.backend import Backend, get_backend, native_available
from tests.test_hash_parity import ARRAY_SUBCLASSES, SETTINGS, arrays, keys

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


@pytest.fixture
def backend(backend_name: str) -> Backend:
    return get_backend(backend_name)


# The specification's dtype table: NumPy kind (and size) -> little-endian dtype, name.
WIRE_TYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I64": "<i8", "U64": "<u8"}


def wire_type(value: Any) -> str:
    if isinstance(value, np.ndarray):
        kind = value.dtype.kind
        if kind == "f":
            return {2: "F16", 4: "F32"}.get(value.dtype.itemsize, "F64")
        return {"i": "I64", "u": "U64"}[kind]
    return "F64"


def reference_digest(gradients: Mapping[str, Any]) -> str:
    """The layout of the specification, byte by byte, hashed with hashlib."""
    layout = bytearray(b"aumai-fedtrain/wire-digest/v1\n")
    layout += struct.pack("<Q", len(gradients))
    for name in sorted(key.encode("utf-8", "surrogatepass") for key in gradients):
        value = gradients[name.decode("utf-8", "surrogatepass")]
        dtype = wire_type(value)
        array = np.asarray(value, dtype=WIRE_TYPES[dtype])
        layout += struct.pack("<Q", len(name)) + name
        layout += struct.pack("<Q", 3) + dtype.encode("ascii")
        layout += struct.pack(f"<Q{array.ndim}Q", array.ndim, *array.shape)
        data = array.tobytes(order="C")
        layout += struct.pack("<Q", len(data)) + data
    return hashlib.sha256(bytes(layout)).hexdigest()


wire_values = st.one_of(
    arrays(),
    hnp.arrays(np.float64, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)),
    st.lists(st.floats(allow_nan=False), max_size=5),
    st.floats(),
    st.integers(min_value=-(2**53), max_value=2**53),
)


@SETTINGS
@given(gradients=st.dictionaries(keys, wire_values, max_size=5))
def test_digest_of_any_map_is_sha256_of_the_specified_layout(
    backend: Backend, gradients: dict[str, Any]
) -> None:
    # Execute
    result = backend.wire_digest(gradients)

    # Assert
    assert result == reference_digest(gradients)


def test_the_documented_example_byte_by_byte() -> None:
    # Prepare: digest.py's example, {"w": float32 [1.5]}, written out in hex.
    layout = bytes.fromhex(
        b"aumai-fedtrain/wire-digest/v1\n".hex()
        + "0100000000000000"  # one entry
        + "0100000000000000"
        + "77"  # the key "w"
        + "0300000000000000"
        + "463332"  # "F32"
        + "0100000000000000"
        + "0100000000000000"  # one dimension, of 1
        + "0400000000000000"
        + "0000c03f"  # 4 bytes: 1.5 as little-endian float32
    )

    # Execute / Assert
    for name in ("python", "native") if native_available() else ("python",):
        gradients = {"w": np.array([1.5], dtype=np.float32)}
        assert digest.wire_digest(gradients, name) == hashlib.sha256(layout).hexdigest()
    assert (
        f"aumai-fedtrain/wire-digest/v{digest.WIRE_DIGEST_VERSION}\n".encode()
        == digest.WIRE_DIGEST_MAGIC
    )


def test_dtype_shape_values_and_keys_each_change_the_digest(backend: Backend) -> None:
    # Prepare
    base = {"w": np.array([1.0, 2.0])}
    variants = [
        {"w": np.array([1.0, 2.0], dtype=np.float32)},
        {"w": np.array([1.0, 2.0], dtype=np.float16)},
        {"w": np.array([[1.0, 2.0]])},
        {"w": np.array([1.0, -2.0])},
        {"w": np.array([1, 2])},
        {"v": np.array([1.0, 2.0])},
        {"w": np.array([1.0, 2.0]), "x": np.array([], dtype=np.float64)},
    ]

    # Execute
    digests = {backend.wire_digest(variant) for variant in [base, *variants]}

    # Assert
    assert len(digests) == len(variants) + 1


def test_layouts_of_the_same_values_give_one_digest(backend: Backend) -> None:
    # Prepare: one float64 matrix held in C order, Fortran order, big-endian and strided.
    matrix = np.arange(12, dtype=np.float64).reshape(3, 4) / 7.0
    wide = np.zeros((3, 8))
    wide[:, ::2] = matrix
    layouts = [matrix, np.asfortranarray(matrix), matrix.astype(">f8"), wide[:, ::2]]

    # Execute
    digests = {backend.wire_digest({"w": layout}) for layout in layouts}

    # Assert
    assert digests == {reference_digest({"w": matrix})}


@pytest.mark.skipif(not native_available(), reason="the native extension is not built")
def test_a_large_update_digests_alike_on_both_backends() -> None:
    # Prepare: more bytes than the native core's copy buffer, in several keys and dtypes.
    rng = np.random.default_rng(5)
    gradients = {
        "layer.0.weight": rng.standard_normal((300, 257)),
        "layer.0.bias": rng.standard_normal(257).astype(np.float32),
        "step": np.array(12, dtype=np.int64),
    }

    # Execute
    native = get_backend("native").wire_digest(gradients)
    python = get_backend("python").wire_digest(gradients)

    # Assert
    assert native == python == reference_digest(gradients)


@pytest.mark.parametrize(
    ("gradients", "error", "match"),
    [
        ({"w": "1.0"}, TypeError, "'w'"),
        ({"w": [1.0, None]}, TypeError, "'w'"),
        ({"w": np.array([True])}, TypeError, "'w'"),
        ({"w": [[1.0], [2.0, 3.0]]}, ValueError, "'w'.*rectangular"),
        ({1: [1.0]}, TypeError, "keys must be str"),
        ([("w", 1.0)], TypeError, "mapping"),
    ],
    ids=["string", "none", "bool_array", "ragged", "int_key", "not_a_mapping"],
)
def test_bad_input_is_an_error_naming_the_key(
    backend: Backend, gradients: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        backend.wire_digest(gradients)


@pytest.mark.parametrize("make", ARRAY_SUBCLASSES)
def test_numpy_array_subclasses_are_type_errors(backend: Backend, make: Any) -> None:
    with pytest.raises(TypeError, match=r"'w'.*subclass"):
        backend.wire_digest({"w": make()})
