"""Pure-Python reference implementations of the hot paths.

These functions *define* the contracts that the native core (``aumai_fedtrain._native``)
reproduces, and serve as the fallback when the extension is unavailable:

- :func:`canonical_hash` is ``sha256(json.dumps(plain(g), sort_keys=True))`` where ``plain``
  turns NumPy arrays into ``.tolist()``; anyone can recompute it with the standard library.
  :func:`canonical_hashes` is the same for many maps at once.
- :func:`weighted_average` is the per-key weighted mean over the updates that carry a
  non-empty value for the key, computed in float64 by one specified sequence of roundings
  (see the function) and given in the inputs' float type, which the native core reproduces
  bit for bit.
- :func:`wire_digest` is the SHA-256 of a binary layout of the map (its keys, dtypes, shapes
  and little-endian bytes, :mod:`aumai_fedtrain.digest`), what update signatures cover.
- :func:`max_abs` is the largest magnitude of each value of many maps, what screening bounds.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

import numpy as np

EMPTY_UPDATES_MESSAGE = "Cannot average an empty list of updates."
WEIGHTS_OVERFLOW_MESSAGE = (
    "the weights sum to more than float64 can hold (their total overflows to inf): scale them down"
)

# NumPy dtype kinds that serialise as JSON numbers: signed/unsigned ints and floats.
_NUMERIC_KINDS = frozenset("iuf")


def _describe(value: object) -> str:
    return type(value).__name__


def _check_value(key: str, value: Any) -> None:
    """Check the types of one gradient value (hashed or averaged alike)."""
    if isinstance(value, np.ndarray) and type(value) is not np.ndarray:
        # A subclass (masked array, matrix, ...) carries meaning a plain array does not.
        raise TypeError(
            f"gradient {key!r}: {_describe(value)} is a NumPy array subclass, which is not "
            "accepted: pass a plain numpy.ndarray"
        )
    if isinstance(value, np.ndarray | np.generic):
        if value.dtype.kind not in _NUMERIC_KINDS:
            raise TypeError(
                f"gradient {key!r}: array dtype {value.dtype} is not numeric "
                "(expected a float or int dtype)"
            )
    elif isinstance(value, list | tuple):
        _check_numbers(key, value)
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"gradient {key!r}: expected a number or a list of numbers, got {_describe(value)}"
        )


def _plain_value(key: str, value: Any) -> Any:
    """Return the JSON-equivalent plain form of one gradient value, validating its types."""
    _check_value(key, value)
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else value


def _check_numbers(key: str, values: list[Any] | tuple[Any, ...]) -> None:
    """Check that a (nested) list holds only ints and floats."""
    if all(type(item) is float for item in values):
        return
    for item in values:
        if isinstance(item, list | tuple):
            _check_numbers(key, item)
        elif isinstance(item, bool) or not isinstance(item, int | float):
            raise TypeError(f"gradient {key!r}: expected numbers, found {_describe(item)} {item!r}")


def _plain(gradients: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(gradients, Mapping):
        raise TypeError(
            f"gradients must be a mapping of str to numbers, got {_describe(gradients)}"
        )
    plain: dict[str, Any] = {}
    for key, value in gradients.items():
        if not isinstance(key, str):
            raise TypeError(f"gradient keys must be str, got {_describe(key)} {key!r}")
        plain[key] = _plain_value(key, value)
    return plain


def canonical_json(gradients: Mapping[str, Any]) -> str:
    """The canonical text whose SHA-256 is the gradient digest."""
    return json.dumps(_plain(gradients), sort_keys=True)


def canonical_hash(gradients: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of the canonical JSON serialisation of ``gradients``."""
    return hashlib.sha256(canonical_json(gradients).encode("utf-8")).hexdigest()


def canonical_hashes(maps: Sequence[Mapping[str, Any]]) -> list[str]:
    """:func:`canonical_hash` of each map."""
    return [canonical_hash(gradients) for gradients in maps]


# Float dtypes an array keeps (by item size): float16, float32, float64.
_KEPT_FLOAT_SIZES = frozenset((2, 4, 8))


def _as_float_array(key: str, value: Any, label: str | None = None) -> np.ndarray:
    """``value`` as a float array; errors name the update.

    float64, float32 and float16 arrays are returned as they are (their values are read as the
    doubles they widen to exactly); anything else as ``np.asarray(value, dtype=np.float64)``
    reads it.
    """
    prefix = f"{label}: " if label is not None else ""
    try:
        _check_value(key, value)
    except TypeError as exc:
        raise TypeError(f"{prefix}{exc}") from None
    if _kept_float(value):
        return value
    try:
        return np.asarray(value, dtype=np.float64)
    except ValueError:  # ragged nested lists
        site = f"gradient {key!r}" + (f" from {label}" if label is not None else "")
        raise ValueError(
            f"{site}: not a rectangular array (the nested lists have different lengths)"
        ) from None


def _kept_float(value: Any) -> TypeGuard[np.ndarray]:
    """Whether ``value`` is an array of a float dtype that keeps its type (float16/32/64)."""
    return (
        isinstance(value, np.ndarray)
        and value.dtype.kind == "f"
        and value.dtype.itemsize in _KEPT_FLOAT_SIZES
    )


def result_dtype(arrays: Sequence[np.ndarray]) -> np.dtype:
    """The dtype of an average of ``arrays``: the widest of their float types.

    All float16 gives float16; float32 (with or without float16) float32; any float64 (or
    integer or list, read as float64) float64, as does no array at all.
    """
    size = max((array.dtype.itemsize if _kept_float(array) else 8 for array in arrays), default=8)
    return np.dtype(f"f{size}")


def _entries(gradients: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The ``(key, value)`` pairs of a gradient map, its keys checked to be ``str``."""
    if not isinstance(gradients, Mapping):
        raise TypeError(
            f"gradients must be a mapping of str to numbers, got {_describe(gradients)}"
        )
    entries = list(gradients.items())
    for key, _ in entries:
        if not isinstance(key, str):
            raise TypeError(f"gradient keys must be str, got {_describe(key)} {key!r}")
    return entries


def max_abs(maps: Sequence[Mapping[str, Any]]) -> list[list[float]]:
    """Per map, per key in the map's order, the largest ``|x|`` of the values read as float64.

    NaN when a value holds a NaN, ``inf`` when it holds an infinity (and no NaN), ``0.0`` for
    an empty value. Raises ``TypeError`` for what :func:`weighted_average` refuses.
    """
    result: list[list[float]] = []
    for gradients in maps:
        row: list[float] = []
        for key, value in _entries(gradients):
            array = _as_float_array(key, value)
            if array.size == 0:
                row.append(0.0)
                continue
            largest, smallest = float(array.max()), float(array.min())  # NaN propagates
            if math.isnan(largest) or math.isnan(smallest):
                row.append(math.nan)
            else:
                row.append(max(abs(largest), abs(smallest)))
        result.append(row)
    return result


WIRE_DIGEST_MAGIC = b"aumai-fedtrain/wire-digest/v1\n"
"""The first bytes of the wire layout; its version is the ``1`` in it."""

# The wire layout's element types: NumPy dtype -> (little-endian dtype, safetensors name).
_WIRE_TYPES = {
    "f2": ("<f2", b"F16"),
    "f4": ("<f4", b"F32"),
    "f": ("<f8", b"F64"),
    "i": ("<i8", b"I64"),
    "u": ("<u8", b"U64"),
}


def _wire_array(key: str, value: Any) -> tuple[np.ndarray, bytes]:
    """The C-ordered little-endian array the wire layout holds for ``value``, and its type.

    Arrays keep their kind: float32 stays float32, float16 float16, other floats become
    float64, signed ints int64, unsigned ints uint64; anything else is read as float64 (as the
    average reads it).
    """
    if isinstance(value, np.ndarray):
        _check_value(key, value)
        kind, size = value.dtype.kind, value.dtype.itemsize
        dtype, name = _WIRE_TYPES[f"f{size}" if kind == "f" and size in (2, 4) else kind]
        return np.asarray(value, dtype=dtype, order="C"), name
    return np.asarray(_as_float_array(key, value), dtype="<f8", order="C"), b"F64"


def _u64(number: int) -> bytes:
    return number.to_bytes(8, "little")


def wire_digest(gradients: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of the binary wire layout of ``gradients`` (see ``digest.py``)."""
    entries = [
        (key.encode("utf-8", "surrogatepass"), *_wire_array(key, value))
        for key, value in _entries(gradients)
    ]
    entries.sort(key=lambda entry: entry[0])
    digest = hashlib.sha256(WIRE_DIGEST_MAGIC + _u64(len(entries)))
    for name, array, dtype in entries:
        digest.update(_u64(len(name)) + name + _u64(len(dtype)) + dtype)
        digest.update(_u64(array.ndim) + b"".join(_u64(dim) for dim in array.shape))
        digest.update(_u64(array.nbytes))
        digest.update(array.reshape(-1).data)
    return digest.hexdigest()


def _sum_in_order(weights: Sequence[float]) -> float:
    """``0.0 + w_0 + w_1 + ...`` rounded after each addition (``sum`` compensates)."""
    total = 0.0
    for weight in weights:
        total += weight
    return total


def _check_weights(weights: Sequence[float], count: int) -> list[float]:
    checked: list[float] = []
    for index, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(
                f"weight #{index} is {_describe(weight)} {weight!r}: "
                "weights must be real numbers (int or float)"
            )
        checked.append(float(weight))
    if len(checked) != count:
        raise ValueError(f"got {len(checked)} weights for {count} updates")
    for index, weight in enumerate(checked):
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight #{index} is {weight!r}: weights must be finite and >= 0")
    # A finite total bounds every key's total: fewer non-negative terms, in the same order.
    if math.isinf(_sum_in_order(checked)):
        raise ValueError(WEIGHTS_OVERFLOW_MESSAGE)
    return checked


def weighted_average(
    updates: Sequence[Mapping[str, Any]],
    weights: Sequence[float],
    labels: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Per-key weighted mean of gradient maps, accumulated in float64.

    For every key in the union of the updates' keys (in order of first appearance), the result
    is ``sum(w_i * x_i) / sum(w_i)`` over the updates that carry a non-empty value for that
    key. A key that no update carries non-empty maps to an empty float64 array. The result has
    the carriers' widest float type (:func:`result_dtype`): float32 carriers give float32,
    float16 ones float16, float64, integer and list carriers float64.

    The arithmetic is one specified sequence, which both backends follow bit for bit: per
    element, ``acc = 0.0``, then for each carrier in update order ``acc = acc + (w_i * x_i)``
    (a rounded product, then a rounded sum), and the result is ``acc / W`` with ``W`` the
    carriers' weights summed in update order from ``0.0``, rounded once (to nearest, ties to
    even) to the result's type. float16 and float32 values are read as the doubles they
    widen to; others as ``np.asarray(value, dtype=np.float64)`` reads them.

    Raises
    ------
    ValueError
        Empty ``updates``, a weight count that does not match, negative or non-finite weights,
        weights whose total overflows float64, values of different shapes for one key, or
        all-zero weights for a key.
    TypeError
        Weights that are not real numbers (bools and strings included), non-str keys,
        non-numeric values, or NumPy array subclasses.
    """
    if len(updates) == 0:
        raise ValueError(EMPTY_UPDATES_MESSAGE)
    checked_weights = _check_weights(weights, len(updates))
    names = list(labels) if labels is not None else [f"update #{i}" for i in range(len(updates))]
    if len(names) != len(updates):
        raise ValueError(f"got {len(names)} labels for {len(updates)} updates")

    carriers: dict[str, list[tuple[str, float, np.ndarray]]] = {}
    for update, weight, label in zip(updates, checked_weights, names, strict=True):
        if not isinstance(update, Mapping):
            raise TypeError(f"{label}: gradients must be a mapping, got {_describe(update)}")
        for key, value in update.items():
            if not isinstance(key, str):
                raise TypeError(f"{label}: gradient keys must be str, got {_describe(key)} {key!r}")
            array = _as_float_array(key, value, label)
            entries = carriers.setdefault(key, [])
            if array.size:
                entries.append((label, weight, array))

    result: dict[str, np.ndarray] = {}
    for key, entries in carriers.items():
        if not entries:
            result[key] = np.empty(0, dtype=np.float64)
            continue
        first_label, _, first = entries[0]
        for label, _, array in entries[1:]:
            if array.shape != first.shape:
                raise ValueError(
                    f"gradient {key!r}: shape {array.shape} from {label} does not "
                    f"match shape {first.shape} from {first_label}"
                )
        total = _sum_in_order([weight for _, weight, _ in entries])
        if total == 0:
            raise ValueError(f"gradient {key!r}: all weights of the updates that carry it are zero")
        acc = np.zeros(first.shape, dtype=np.float64)
        # Non-finite values and overflowing products propagate silently, as in the native core.
        with np.errstate(over="ignore", invalid="ignore"):
            for _, weight, array in entries:
                acc += np.multiply(weight, array, dtype=np.float64)
            acc /= total
            result[key] = acc.astype(result_dtype([array for _, _, array in entries]), copy=False)
    return result
