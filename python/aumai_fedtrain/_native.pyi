"""Native (Rust) hot paths of aumai-fedtrain.

Same contract, signatures and exception types as :mod:`aumai_fedtrain._fallback`. Both
functions release the GIL while they work, read NumPy float64, float32, int64 and uint64 arrays
in place, and never build the whole JSON text.
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

def weighted_average(
    updates: Sequence[Mapping[str, Any]],
    weights: Sequence[float],
    labels: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Per-key weighted mean of gradient maps, in float64.

    For every key in the union of the updates' keys (in order of first appearance), the result
    is ``sum(w_i * x_i) / sum(w_i)`` over the updates that carry a non-empty value for that
    key. A key that no update carries non-empty maps to an empty array.

    The arithmetic is the fallback's, bit for bit: per element, ``acc = 0.0``, then for each
    carrier in update order ``acc = acc + (w_i * x_i)`` (a rounded product, then a rounded sum:
    no fused multiply-add, no reordering across nodes, whatever the number of threads), and the
    result is ``acc / W`` with ``W`` the carriers' weights summed in update order from ``0.0``.
    Values are read as ``np.asarray(value, dtype=np.float64)`` reads them.

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
        Key to a new float64 array of the carriers' shape.

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
