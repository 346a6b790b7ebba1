"""Native (Rust) hot paths of aumai-fedtrain.

Same contract, signatures and exception types as :mod:`aumai_fedtrain._fallback`. Every
function releases the GIL while it works (so calls from several Python threads run side by
side), reads NumPy float64, float32, float16, int64 and uint64 arrays in place, and spreads
large inputs over the available cores; the canonical hash never builds the whole JSON text.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__version__: str
"""The crate version the extension was built from; :mod:`aumai_fedtrain.backend` refuses an
extension whose version differs from the installed package's."""

def canonical_hash(gradients: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of the canonical JSON serialisation of ``gradients``.

    The digest equals
    ``hashlib.sha256(json.dumps(plain(gradients), sort_keys=True).encode("utf-8")).hexdigest()``
    where ``plain`` turns NumPy arrays and scalars into ``.tolist()``: floats are written as
    ``float.__repr__`` writes them, ints exactly, keys escaped with ``ensure_ascii`` and sorted
    by code point.

    Parameters
    ----------
    gradients : Mapping[str, Any]
        Keys to a number, a (nested, possibly ragged) list or tuple of numbers, a NumPy array
        of a float or int dtype (any shape and layout; exactly ``numpy.ndarray``, not a
        subclass), or a NumPy scalar of such a dtype.

    Returns
    -------
    str
        The 64-character lowercase hex digest.

    Raises
    ------
    TypeError
        ``gradients`` is not a mapping, a key is not a ``str``, or a value is not numeric
        (bools, strings, ``None``, non-numeric dtypes, ...) or is a NumPy array subclass
        (``np.ma.MaskedArray``, ``np.matrix``, ...); the message names the key.
    ValueError
        An int too long for ``int.__repr__`` (as ``json.dumps`` raises).
    """

def canonical_hashes(maps: Sequence[Mapping[str, Any]]) -> list[str]:
    """:func:`canonical_hash` of each map, the maps hashed side by side on the available cores.

    Raises as :func:`canonical_hash` does for the first map that it refuses.
    """

def wire_digest(gradients: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of the binary wire layout of ``gradients`` (one pass of SHA-256).

    The layout (:mod:`aumai_fedtrain.digest` gives it byte by byte): keys sorted by their
    UTF-8 bytes, and per key its name, dtype (``F64``, ``F32``, ``F16``, ``I64`` or ``U64``),
    shape and row-major little-endian bytes. Arrays keep their kind (float32 stays float32,
    float16 float16, other floats become float64, ints int64 or uint64); lists and scalars
    are read as float64.

    Raises
    ------
    TypeError
        As :func:`weighted_average` does for one update.
    ValueError
        A ragged nested list (naming the key).
    """

def max_abs(maps: Sequence[Mapping[str, Any]]) -> list[list[float]]:
    """Per map, per key in the map's order, the largest ``|x|`` of the values read as float64.

    NaN when a value holds a NaN, ``inf`` when it holds an infinity and no NaN, ``0.0`` for an
    empty value; exact (a maximum, no rounding). One pass over all values, on every core for
    large inputs: the screening check of finite and bounded updates. Values are checked and
    read as :func:`wire_digest` reads lists and scalars, with the same errors.
    """

def weighted_average(
    updates: Sequence[Mapping[str, Any]],
    weights: Sequence[float],
    labels: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Per-key weighted mean of gradient maps, accumulated in float64.

    For every key in the union of the updates' keys (in order of first appearance), the result
    is ``sum(w_i * x_i) / sum(w_i)`` over the updates that carry a non-empty value for that
    key. A key that no update carries non-empty maps to an empty float64 array.

    The arithmetic is the fallback's, bit for bit: per element, ``acc = 0.0``, then for each
    carrier in update order ``acc = acc + (w_i * x_i)`` (a rounded product, then a rounded sum:
    no fused multiply-add, no reordering across nodes, whatever the number of threads), and the
    result is ``acc / W`` with ``W`` the carriers' weights summed in update order from ``0.0``,
    rounded once (to nearest, ties to even) to the carriers' widest float type: float16 when
    all are float16 arrays, float32 when they are float32 or float16 arrays, else float64.
    float32 and float16 values are read as the doubles they widen to, in place; others as
    ``np.asarray(value, dtype=np.float64)`` reads them.

    Parameters
    ----------
    updates : Sequence[Mapping[str, Any]]
        One gradient map per node; values as for :func:`canonical_hash` (rectangular).
    weights : Sequence[float]
        One finite, non-negative real number per update (an int, a float or a NumPy real
        scalar, converted with ``float``; not a bool or a str), with a finite total.
    labels : Sequence[str] or None, optional
        Names of the updates for error messages; ``"update #i"`` by default.

    Returns
    -------
    dict[str, numpy.ndarray]
        Key to a new array of the carriers' shape, in their widest float type.

    Raises
    ------
    ValueError
        Empty ``updates`` (``"Cannot average an empty list of updates."``), a weight or label
        count that does not match, negative or non-finite weights, weights whose total
        overflows float64, values of different shapes for one key (naming the key and both
        updates), all-zero weights for a key (naming the key), or a ragged nested list (naming
        the key and the update).
    TypeError
        A weight that is not a real number (naming its index), a non-mapping update or a
        non-str key (naming the update), or a non-numeric value or NumPy array subclass
        (naming the key and the update).
    """

def dequantise_average(
    codec: str,
    block_size: int,
    dtype: str,
    count: int,
    codes: Sequence[np.ndarray],
    scales: Sequence[np.ndarray | None],
    weights: Sequence[float],
) -> np.ndarray:
    """The weighted average of ``count`` values that each update encodes with ``codec``
    (``aumai_fedtrain._fallback.dequantise_average``, bit for bit), in one pass over the
    compressed bytes with the GIL released, on every core for large inputs.

    Each update's code bytes (a contiguous uint8 array) and float32 block scales (contiguous;
    None for ``fp16`` and ``bf16``) are decoded ``LANES`` values at a time in a register and
    added, ``acc = acc + (w_i * x_i)`` in update order, to a float64 block of the output that
    stays in cache; the last pass divides by the weights' ordered sum and the block is rounded
    once to ``dtype``. A value decodes as ``compression.decode`` decodes it: ``level * scale``
    exact, rounded once to ``dtype`` (a float32 product for ``float32``, the same rounding).

    Raises
    ------
    ValueError
        An unknown codec or dtype, code or scale arrays of the wrong length, a block size that
        is not a power of two >= 8, non-contiguous arrays, weights as
        :func:`weighted_average` refuses them, or all-zero weights.
    """

class WeightedSum:
    """A running per-key weighted mean: :meth:`fold` batches of updates as they come,
    :meth:`finish` once (``aumai_fedtrain._fallback.WeightedSum``, bit for bit).

    One float64 accumulator per key (O(model) memory; folded updates are not kept). The result
    is :func:`weighted_average` of everything folded, in fold order, bit for bit, whatever the
    split into batches: each fold adds its carriers with the fused kernel (several per pass,
    in order, on every core for large batches), ``finish`` divides by each key's total weight
    and rounds once to the carriers' widest float type.
    """

    def __init__(self) -> None: ...
    def fold(
        self,
        updates: Sequence[Mapping[str, Any]],
        weights: Sequence[float],
        labels: Sequence[str] | None = None,
    ) -> None:
        """Add ``updates`` weighted by ``weights`` after those already folded (the GIL
        released while adding); a failed fold adds nothing.

        Raises
        ------
        ValueError
            As :func:`weighted_average` does (an empty batch is no error), weights numbered
            from the updates already folded; a shape that differs from the key's first
            carrier, in this batch or an earlier one (naming the key and both updates).
        TypeError
            As :func:`weighted_average` does.
        RuntimeError
            The sum is finished.
        """

    def fold_encoded(
        self,
        updates: Sequence[Mapping[str, Any]],
        weights: Sequence[float],
        labels: Sequence[str] | None = None,
    ) -> None:
        """Add encoded ``updates`` (maps of key to ``compression.Encoded`` of a blockwise or
        16-bit codec) weighted by ``weights`` after those already folded: bit for bit ``fold``
        of the decoded updates (``_fallback.WeightedSum.fold_encoded``), in any interleaving
        with plain folds. Each key's codes and scales are read in one pass with the GIL
        released (on every core for large tensors), decoded in registers as
        ``dequantise_average`` decodes them and added, ``acc = acc + (w_i * x_i)``, into the
        key's float64 accumulator: no decoded copy of an update is made. A failed fold adds
        nothing.

        Raises
        ------
        ValueError
            As :meth:`fold` does; codes or scales that do not hold their tensor's values, a
            dtype that is not float16/32/64, or the codec ``none`` (naming key and update).
        TypeError
            As :meth:`fold` does, or a value that is not an ``Encoded``.
        RuntimeError
            The sum is finished.
        """

    def finish(self) -> dict[str, np.ndarray]:
        """The per-key means, keys in order of first appearance; the sum is spent afterwards.

        Raises
        ------
        ValueError
            Nothing was folded (``"Cannot average an empty list of updates."``), or all
            weights of the updates that carry a key are zero (naming the key).
        RuntimeError
            The sum is already finished.
        """

def median(updates: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Coordinate-wise median of gradient maps, in float64 (``aumai_fedtrain.robust.median``).

    Every map must have the keys of the first, in the same order, with the same shapes. Values
    are read as float64 and ``-0.0`` as ``+0.0``; an even count's median is ``(a + b) * 0.5``.
    Threaded over coordinates; the values must be finite (``aumai_fedtrain.robust`` checks).

    Raises
    ------
    ValueError
        No maps (``"cannot aggregate an empty list of updates"``), keys or shapes that differ.
    TypeError
        As :func:`weighted_average` does.
    """

def trimmed_mean(updates: Sequence[Mapping[str, Any]], trim: int) -> dict[str, np.ndarray]:
    """Coordinate-wise mean without the ``trim`` smallest and ``trim`` largest values.

    The kept values are summed in ascending order from ``0.0`` and divided by their count.
    Raises as :func:`median` does, and ``ValueError`` when ``2 * trim >= len(updates)``.
    """

def squared_distances(
    updates: Sequence[Mapping[str, Any]], center: Mapping[str, Any] | None = None
) -> list[float]:
    """Each map's squared L2 distance to ``center`` (its squared norm when None).

    Per key, the squared differences accumulate in 8 lanes (value ``i`` into lane ``i % 8``),
    combined as ``((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))``; the keys' sums are added
    in key order from ``0.0``. Threaded over the maps. Raises as :func:`median` does (a
    ``center`` with other keys is named ``center``).
    """

def pairwise_squared_distances(updates: Sequence[Mapping[str, Any]]) -> list[list[float]]:
    """The symmetric ``N x N`` matrix of squared L2 distances (as :func:`squared_distances`
    sums them; zero diagonal), threaded over the pairs. Raises as :func:`median` does."""

def balance_statistics(
    updates: Sequence[Mapping[str, Any]],
    center: Mapping[str, Any] | None = None,
    reference: Mapping[str, Any] | None = None,
) -> list[tuple[int, int, float, float]]:
    """Per map, in one threaded pass: its values strictly below and strictly above ``center``
    (0 and 0 without one; ties count on neither side), its dot product with ``reference``
    (0.0 without one) and its squared L2 norm.

    The dot product and the norm sum per key in 8 lanes as :func:`squared_distances` does (the
    norm has its bits). Raises as :func:`median` does (a ``center`` or ``reference`` with other
    keys is named so).
    """
