"""Pure-Python reference implementations of the two hot paths.

These functions *define* the contracts that the native core (``aumai_fedtrain._native``)
reproduces, and serve as the fallback when the extension is unavailable:

- :func:`canonical_hash` is ``sha256(json.dumps(plain(g), sort_keys=True))`` where ``plain``
  turns NumPy arrays into ``.tolist()``; anyone can recompute it with the standard library.
- :func:`weighted_average` is the per-key weighted mean over the updates that carry a
  non-empty value for the key, accumulated in float64 with NumPy.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

EMPTY_UPDATES_MESSAGE = "Cannot average an empty list of updates."

# NumPy dtype kinds that serialise as JSON numbers: signed/unsigned ints and floats.
_NUMERIC_KINDS = frozenset("iuf")


def _describe(value: object) -> str:
    return type(value).__name__


def _plain_value(key: str, value: Any) -> Any:
    """Return the JSON-equivalent plain form of one gradient value, validating its types."""
    if isinstance(value, np.ndarray | np.generic):
        if value.dtype.kind not in _NUMERIC_KINDS:
            raise TypeError(
                f"gradient {key!r}: array dtype {value.dtype} is not numeric "
                "(expected a float or int dtype)"
            )
        return value.tolist()
    if isinstance(value, list | tuple):
        _check_numbers(key, value)
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"gradient {key!r}: expected a number or a list of numbers, got {_describe(value)}"
        )
    return value


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


def _as_float_array(key: str, label: str, value: Any) -> np.ndarray:
    try:
        plain = _plain_value(key, value)
    except TypeError as exc:
        raise TypeError(f"{label}: {exc}") from None
    try:
        return np.asarray(plain, dtype=np.float64)
    except ValueError as exc:  # ragged nested lists
        raise ValueError(
            f"gradient {key!r} from {label}: not a rectangular array ({exc})"
        ) from None


def _check_weights(weights: Sequence[float], count: int) -> list[float]:
    checked = [float(w) for w in weights]
    if len(checked) != count:
        raise ValueError(f"got {len(checked)} weights for {count} updates")
    for index, weight in enumerate(checked):
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight #{index} is {weight!r}: weights must be finite and >= 0")
    return checked


def weighted_average(
    updates: Sequence[Mapping[str, Any]],
    weights: Sequence[float],
    labels: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Per-key weighted mean of gradient maps, in float64.

    For every key in the union of the updates' keys (in order of first appearance), the result
    is ``sum(w_i * x_i) / sum(w_i)`` over the updates that carry a non-empty value for that
    key. A key that no update carries non-empty maps to an empty array.

    Raises
    ------
    ValueError
        Empty ``updates``, a weight count that does not match, negative or non-finite weights,
        values of different shapes for one key, or all-zero weights for a key.
    TypeError
        Non-str keys or non-numeric values.
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
            array = _as_float_array(key, label, value)
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
        total = sum(weight for _, weight, _ in entries)
        if total == 0:
            raise ValueError(f"gradient {key!r}: all weights of the updates that carry it are zero")
        acc = np.zeros(first.shape, dtype=np.float64)
        for _, weight, array in entries:
            acc += (weight / total) * array
        result[key] = acc
    return result
