"""The average of compressed updates (:func:`compression.average_encoded`): on both backends,
bit for bit the backend's ``weighted_average`` of the decoded updates, for every codec, model
dtype and update count, NaN and infinite codes and scales included; and its errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aumai_fedtrain.backend import get_backend
from aumai_fedtrain.compression import CODECS, Codec, Encoded, average_encoded, decode, encode

DTYPES = (np.float16, np.float32, np.float64)
SCALES = st.floats(width=32)  # NaN, infinities, subnormals and negative scales included
WEIGHTS = st.floats(0.0, 1e3, allow_nan=False, allow_infinity=False)


def code_bytes(codec: Codec, count: int, dtype: np.dtype) -> int:
    if codec.name == "none":
        return count * dtype.itemsize
    if codec.name in ("fp16", "bf16"):
        return 2 * count
    return count if codec.name == "int8" else (count + 1) // 2


CODE_DTYPES = {"fp16": np.float16, "bf16": np.uint16, "int8": np.int8, "int4": np.uint8}


def raw_encoding(
    data: st.DataObject, codec: Codec, shape: tuple[int, ...], dtype: np.dtype
) -> Encoded:
    """Arbitrary codes (any bits: NaN and infinite 16-bit floats too) and scales."""
    count = math.prod(shape)
    raw = data.draw(hnp.arrays(np.uint8, code_bytes(codec, count, dtype)))
    code_dtype = dtype if codec.name == "none" else CODE_DTYPES.get(codec.name, np.uint8)
    scales = None
    if codec.blockwise:
        blocks = math.ceil(count / codec.block_size)
        scales = data.draw(hnp.arrays(np.float32, blocks, elements=SCALES))
    return Encoded(codec, raw.view(code_dtype), scales, shape, dtype)


def same_bits(got: np.ndarray, expected: np.ndarray) -> None:
    """Equal dtype, shape and bits, except that NaNs only need to be at the same places."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan)
    width = f"u{expected.dtype.itemsize}"
    np.testing.assert_array_equal(got[~nan].view(width), expected[~nan].view(width))


def reference(
    updates: list[dict[str, Encoded]], weights: list[float], backend_name: str
) -> dict[str, np.ndarray]:
    """Decode every update with NumPy, then the backend's own ``weighted_average``."""
    with np.errstate(all="ignore"):
        decoded = [{key: decode(value) for key, value in update.items()} for update in updates]
    return get_backend(backend_name).weighted_average(decoded, weights)


def check_parity(
    updates: list[dict[str, Encoded]], weights: list[float], backend_name: str
) -> None:
    expected = reference(updates, weights, backend_name)
    got = average_encoded(updates, weights, backend=backend_name)
    assert list(got) == list(expected)
    for key in expected:
        same_bits(got[key], expected[key])


ANY_ENCODINGS = {
    "data": st.data(),
    "block": st.sampled_from([8, 16, 64]),
    "dtype": st.sampled_from(DTYPES),
    "shape": hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=45),
    "nodes": st.integers(1, 11),
}
"""Strategies of arbitrary encodings of one key by each of ``nodes`` updates (with a codec)."""
PARITY_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@given(codec=st.sampled_from(CODECS), **ANY_ENCODINGS)
@PARITY_SETTINGS
def test_any_codes_and_scales_average_as_decoding_then_averaging(
    backend_name: str,
    data: st.DataObject,
    codec: str,
    block: int,
    dtype: type,
    shape: tuple[int, ...],
    nodes: int,
) -> None:
    chosen = Codec(codec, block)  # type: ignore[arg-type]
    updates = [{"w": raw_encoding(data, chosen, shape, np.dtype(dtype))} for _ in range(nodes)]
    weights = data.draw(st.lists(WEIGHTS, min_size=nodes, max_size=nodes))
    if sum(weights) == 0 and 0 not in shape:
        with pytest.raises(ValueError, match="all weights of the updates that carry it are zero"):
            average_encoded(updates, weights, backend=backend_name)
        return
    check_parity(updates, weights, backend_name)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nodes", [1, 2, 13])
def test_encoded_model_updates_of_several_keys_average_as_decoded(
    backend_name: str, codec: str, dtype: type, nodes: int
) -> None:
    """Real encodings of a model of several keys (one key some nodes leave out, one empty),
    lengths not a multiple of the block, node counts across the kernel's fused passes."""
    rng = np.random.default_rng(nodes)
    chosen = Codec(codec, 64)  # type: ignore[arg-type]
    shapes = {"bias": (7,), "w": (33, 61), "big": (5003,), "empty": (0,)}
    updates = []
    for node in range(nodes):
        update = {}
        for key, shape in shapes.items():
            if key == "bias" and node % 3 == 1:
                continue
            values: np.ndarray = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 3)).astype(
                dtype
            )
            update[key] = encode(values, chosen)
        updates.append(update)
    weights = [float(rng.integers(0, 50)) + 0.5 for _ in range(nodes)]
    check_parity(updates, weights, backend_name)


@pytest.mark.parametrize("codec", ["int8", "int4", "e3m0", "bf16"])
def test_large_keys_split_across_threads_keep_the_bits(backend_name: str, codec: str) -> None:
    """Enough values for the native kernel to split the key across threads and blocks."""
    rng = np.random.default_rng(7)
    chosen = Codec(codec, 8)  # type: ignore[arg-type]
    count = 300_007
    updates = [
        {"w": encode(rng.standard_normal(count).astype(np.float32), chosen)} for _ in range(5)
    ]
    check_parity(updates, [1.0, 2.5, 0.0, 7.0, 3.25], backend_name)


def test_both_backends_agree(backend_name: str) -> None:
    rng = np.random.default_rng(3)
    updates = [{"w": encode(rng.standard_normal(1001), Codec("int4", 16))} for _ in range(4)]
    native_or_python = average_encoded(updates, [1, 2, 3, 4], backend=backend_name)["w"]
    python = average_encoded(updates, [1, 2, 3, 4], backend="python")["w"]
    same_bits(native_or_python, python)


def encoded(
    codec: str = "int8", count: int = 10, block: int = 8, dtype: type = np.float32
) -> Encoded:
    return encode(np.linspace(-1, 1, count).astype(dtype), Codec(codec, block))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (encoded("int4"), "gradient 'w': codec int4 from update #1 does not match codec int8"),
        (encoded(block=16), "gradient 'w': block size 16 from update #1 does not match"),
        (encoded(count=11), r"gradient 'w': shape \(11,\) from update #1 does not match"),
        (encoded(dtype=np.float64), "gradient 'w': dtype float64 from update #1 does not match"),
    ],
)
def test_encodings_of_one_key_must_agree(backend_name: str, second: Encoded, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        average_encoded([{"w": encoded()}, {"w": second}], [1, 1], backend=backend_name)


def test_codes_and_scales_must_hold_the_values(backend_name: str) -> None:
    good = encoded()
    short = Encoded(good.codec, good.codes[:-1], good.scales, good.shape, good.dtype)
    with pytest.raises(ValueError, match="gradient 'w' from update #0: int8 codes of 10 values"):
        average_encoded([{"w": short}], [1], backend=backend_name)
    wide = Encoded(good.codec, good.codes, good.scales.astype(np.float64), good.shape, good.dtype)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="int8 scales are 2 float32 values"):
        average_encoded([{"w": wide}], [1], backend=backend_name)
    ints = Encoded(good.codec, good.codes, good.scales, good.shape, np.dtype(np.int32))
    with pytest.raises(ValueError, match="dtype int32 is not float16, float32 or float64"):
        average_encoded([{"w": ints}], [1], backend=backend_name)


def test_weight_errors_are_the_plain_averages(backend_name: str) -> None:
    one = [{"w": encoded()}]
    with pytest.raises(ValueError, match=r"Cannot average an empty list of updates\."):
        average_encoded([], [], backend=backend_name)
    with pytest.raises(ValueError, match="got 2 weights for 1 updates"):
        average_encoded(one, [1, 2], backend=backend_name)
    with pytest.raises(ValueError, match=r"weight #0 is -1\.0"):
        average_encoded(one, [-1.0], backend=backend_name)
    with pytest.raises(ValueError, match="weight #0 is nan"):
        average_encoded(one, [math.nan], backend=backend_name)
    with pytest.raises(TypeError, match="weight #0 is bool"):
        average_encoded(one, [True], backend=backend_name)
    with pytest.raises(ValueError, match="all weights of the updates that carry it are zero"):
        average_encoded([{"w": encoded()}, {"v": encoded()}], [0, 1], backend=backend_name)
    with pytest.raises(TypeError, match="update #0: gradient 'w' is ndarray, expected Encoded"):
        average_encoded([{"w": np.zeros(3)}], [1], backend=backend_name)  # type: ignore[dict-item]
