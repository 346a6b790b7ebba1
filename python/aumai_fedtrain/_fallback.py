"""Pure-Python reference implementations of the hot paths.

These functions *define* the contracts that the native core (``aumai_fedtrain._native``)
reproduces, and serve as the fallback when the extension is unavailable:

- :func:`canonical_hash` is ``sha256(json.dumps(plain(g), sort_keys=True))`` where ``plain``
  turns NumPy arrays into ``.tolist()``; anyone can recompute it with the standard library.
  :func:`canonical_hashes` is the same for many maps at once.
- :func:`weighted_average` is the per-key weighted mean over the updates that carry a
  non-empty value for the key, computed in float64 by one specified sequence of roundings
  (see the function) and given in the inputs' float type, which the native core reproduces
  bit for bit; :class:`WeightedSum` computes it fold by fold as updates arrive.
- :func:`wire_digest` is the SHA-256 of a binary layout of the map (its keys, dtypes, shapes
  and little-endian bytes, :mod:`aumai_fedtrain.digest`), what update signatures cover.
- :func:`max_abs` is the largest magnitude of each value of many maps, what screening bounds.
- :func:`dequantise_average` is the weighted average of one key's compressed updates:
  :func:`aumai_fedtrain.compression.decode` of each, then :func:`weighted_average`.
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


def _check_weights(
    weights: Sequence[float], count: int, first: int = 0, total: float = 0.0
) -> tuple[list[float], float]:
    """The weights of ``count`` updates as floats and ``total`` plus their sum (in order).

    ``first`` updates whose weights sum to ``total`` came before (a running sum's earlier
    folds): messages number the weights from ``first``, and the new total must be finite.
    """
    checked: list[float] = []
    for index, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise TypeError(
                f"weight #{first + index} is {_describe(weight)} {weight!r}: "
                "weights must be real numbers (int or float)"
            )
        checked.append(float(weight))
    if len(checked) != count:
        raise ValueError(f"got {len(checked)} weights for {count} updates")
    for index, weight in enumerate(checked):
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(
                f"weight #{first + index} is {weight!r}: weights must be finite and >= 0"
            )
    # A finite total bounds every key's total: fewer non-negative terms, in the same order.
    # (``sum`` compensates: the total is rounded after each addition instead.)
    for weight in checked:
        total += weight
    if math.isinf(total):
        raise ValueError(WEIGHTS_OVERFLOW_MESSAGE)
    return checked, total


class _KeySum:
    """One key's running sum: ``sum(w_i * x_i)`` in float64, ``sum(w_i)``, the carriers'
    widest float type and the first carrier's label and shape."""

    def __init__(self, label: str, array: np.ndarray) -> None:
        self.first = (label, array.shape)
        self.acc = np.zeros(array.shape, dtype=np.float64)
        self.total = 0.0
        self.dtype = result_dtype([array])

    def add(self, weight: float, array: np.ndarray) -> None:
        """``acc = acc + (w * x)`` elementwise (a rounded product, then a rounded sum)."""
        # Non-finite values and overflowing products propagate silently, as in the native core.
        with np.errstate(over="ignore", invalid="ignore"):
            self.acc += np.multiply(weight, array, dtype=np.float64)
        self.total += weight
        self.dtype = max(self.dtype, result_dtype([array]), key=lambda dtype: dtype.itemsize)


class WeightedSum:
    """A running per-key weighted mean: :meth:`fold` batches of updates as they come,
    :meth:`finish` once.

    The result is :func:`weighted_average` of everything folded, in fold order, bit for bit,
    whatever the split into batches: one float64 accumulator per key (O(model) memory; the
    updates are not kept), each carrier added in order, divided and rounded once at the end.
    """

    def __init__(self) -> None:
        self._sums: dict[str, _KeySum | None] = {}
        self._folded = 0
        self._weight_total = 0.0
        self._finished = False

    def fold(
        self,
        updates: Sequence[Mapping[str, Any]],
        weights: Sequence[float],
        labels: Sequence[str] | None = None,
    ) -> None:
        """Add ``updates`` weighted by ``weights`` after those already folded.

        Checks everything before adding anything, so a failed fold leaves the sum unchanged.

        Raises
        ------
        ValueError
            As :func:`weighted_average` does (an empty batch is no error), weights numbered
            from the updates already folded; a shape that differs from the key's first
            carrier, in this batch or an earlier one.
        TypeError
            As :func:`weighted_average` does.
        RuntimeError
            The sum is finished.
        """
        self._check_open()
        checked, total = _check_weights(weights, len(updates), self._folded, self._weight_total)
        names = _labels(labels, self._folded, len(updates))
        carriers = _carriers(updates, checked, names)
        for key, entries in carriers.items():
            known = self._sums.get(key)
            if not entries:
                continue
            first_label, first_shape = (
                known.first if known else (entries[0][0], entries[0][2].shape)
            )
            for label, _, array in entries:
                if array.shape != first_shape:
                    raise ValueError(
                        f"gradient {key!r}: shape {array.shape} from {label} does not "
                        f"match shape {first_shape} from {first_label}"
                    )
        for key, entries in carriers.items():
            key_sum = self._sums.get(key)
            for label, weight, array in entries:
                if key_sum is None:
                    key_sum = _KeySum(label, array)
                key_sum.add(weight, array)
            self._sums[key] = key_sum
        self._folded += len(updates)
        self._weight_total = total

    def fold_encoded(
        self,
        updates: Sequence[Mapping[str, Any]],
        weights: Sequence[float],
        labels: Sequence[str] | None = None,
    ) -> None:
        """Add encoded ``updates`` (maps of key to :class:`aumai_fedtrain.compression.Encoded`
        of a blockwise or 16-bit codec) weighted by ``weights`` after those already folded:
        :meth:`fold` of the decoded updates (:func:`aumai_fedtrain.compression.decode`), which
        is what it does. A failed fold leaves the sum unchanged.

        Raises
        ------
        ValueError
            As :meth:`fold` does; codes or scales that do not hold their tensor's values, or
            the codec ``none`` (its values are plain arrays: :meth:`fold` them).
        TypeError
            As :meth:`fold` does, or a value that is not an ``Encoded``.
        RuntimeError
            The sum is finished.
        """
        # compression imports the models, which use the backends: import it when first needed.
        from aumai_fedtrain.compression import decode_map

        self._check_open()
        _check_weights(weights, len(updates), self._folded, self._weight_total)
        names = _labels(labels, self._folded, len(updates))
        decoded = []
        for update, label in zip(updates, names, strict=True):
            for key, encoded in update.items() if isinstance(update, Mapping) else ():
                if getattr(getattr(encoded, "codec", None), "name", None) == "none":
                    raise ValueError(f'gradient {key!r} from {label}: codec "none" has no codes')
            decoded.append(decode_map(update, label))
        self.fold(decoded, weights, names)

    def finish(self) -> dict[str, np.ndarray]:
        """The per-key means, keys in order of first appearance (see :func:`weighted_average`);
        the sum is spent afterwards.

        Raises
        ------
        ValueError
            Nothing was folded, or all weights of the updates that carry a key are zero.
        RuntimeError
            The sum is already finished.
        """
        self._check_open()
        if self._folded == 0:
            raise ValueError(EMPTY_UPDATES_MESSAGE)
        for key, key_sum in self._sums.items():
            if key_sum is not None and key_sum.total == 0:
                raise ValueError(
                    f"gradient {key!r}: all weights of the updates that carry it are zero"
                )
        self._finished = True
        result: dict[str, np.ndarray] = {}
        for key, key_sum in self._sums.items():
            if key_sum is None:
                result[key] = np.empty(0, dtype=np.float64)
                continue
            with np.errstate(over="ignore", invalid="ignore"):
                key_sum.acc /= key_sum.total
            result[key] = key_sum.acc.astype(key_sum.dtype, copy=False)
        self._sums = {}
        return result

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError("this WeightedSum is finished: start a new one for another mean")


def _labels(labels: Sequence[str] | None, first: int, count: int) -> list[str]:
    """``labels`` as a list (``update #i`` from ``first`` by default), checked to be ``count``."""
    names = list(labels) if labels is not None else [f"update #{first + i}" for i in range(count)]
    if len(names) != count:
        raise ValueError(f"got {len(names)} labels for {count} updates")
    return names


def _carriers(
    updates: Sequence[Mapping[str, Any]], weights: Sequence[float], labels: Sequence[str]
) -> dict[str, list[tuple[str, float, np.ndarray]]]:
    """Per key (in order of first appearance), the ``(label, weight, array)`` of each update
    that carries a non-empty value for it, the values checked and read as float arrays."""
    carriers: dict[str, list[tuple[str, float, np.ndarray]]] = {}
    for update, weight, label in zip(updates, weights, labels, strict=True):
        if not isinstance(update, Mapping):
            raise TypeError(f"{label}: gradients must be a mapping, got {_describe(update)}")
        for key, value in update.items():
            if not isinstance(key, str):
                raise TypeError(f"{label}: gradient keys must be str, got {_describe(key)} {key!r}")
            array = _as_float_array(key, value, label)
            entries = carriers.setdefault(key, [])
            if array.size:
                entries.append((label, weight, array))
    return carriers


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
    widen to; others as ``np.asarray(value, dtype=np.float64)`` reads them. It is
    :class:`WeightedSum` with everything folded at once.

    Raises
    ------
    ValueError
        Empty ``updates``, a weight count that does not match, negative or non-finite weights,
        weights whose total overflows float64, values of different shapes for one key (every
        key's shapes are checked before any key's weights), or all-zero weights for a key.
    TypeError
        Weights that are not real numbers (bools and strings included), non-str keys,
        non-numeric values, or NumPy array subclasses.
    """
    if len(updates) == 0:
        raise ValueError(EMPTY_UPDATES_MESSAGE)
    total = WeightedSum()
    total.fold(updates, weights, labels)
    return total.finish()


def dequantise_average(
    codec: str,
    block_size: int,
    dtype: str,
    count: int,
    codes: Sequence[np.ndarray],
    scales: Sequence[np.ndarray | None],
    weights: Sequence[float],
) -> np.ndarray:
    """The weighted average of ``count`` values that each update encodes with ``codec``.

    The reference of the native kernel: each update's ``codes`` (its code bytes as a uint8
    array) and ``scales`` (float32 block scales, None for fp16 and bf16) decoded by
    :func:`aumai_fedtrain.compression.decode` to ``dtype`` (``"float16"``, ``"float32"`` or
    ``"float64"``), then :func:`weighted_average` of the decoded arrays, as a flat array of
    ``dtype``. :func:`aumai_fedtrain.compression.average_encoded` checks the codes and
    weights before calling it.
    """
    # compression imports the models, which use the backends: import it when first needed.
    from aumai_fedtrain.compression import decode_bytes

    with np.errstate(over="ignore", invalid="ignore"):  # NaN and inf decode as they are
        decoded = [
            {"": decode_bytes(codec, block_size, dtype, count, piece, block_scales)}
            for piece, block_scales in zip(codes, scales, strict=True)
        ]
    return weighted_average(decoded, weights)[""]
