"""Byzantine-robust aggregation rules: pure functions over the round's updates.

Each rule takes every screened update of a round at once (gradient maps with the same keys and
shapes), so for these rules, and for norm clipping, the coordinator collects the whole round;
only the plain mean without norm clipping is folded as updates arrive
(:attr:`RobustAggregator.streams`). Each returns one gradient map in the updates' widest float
type, like the weighted mean of :mod:`aumai_fedtrain.aggregation` (float32 updates give a
float32 result; every rule computes in float64 and rounds once at the end):

- :func:`median`: the coordinate-wise median;
- :func:`trimmed_mean`: per coordinate, drop the ``floor(beta * N)`` largest and smallest
  values and average the rest;
- :func:`krum`: multi-Krum (Blanchard et al. 2017, El Mhamdi et al. 2018): score each update by
  the summed squared L2 distances to its ``N - f - 2`` nearest neighbours and average the ``m``
  best-scored updates;
- :func:`centered_clip`: CenteredClip (Karimireddy et al. 2021, as in hivemind), started from
  the round's coordinate-wise median or (``clip_start = "previous"``) from the previous round's
  aggregate, which the coordinator passes from ``GlobalState.global_weights`` (so checkpoints
  already keep it); its default radius is a multiple of the round's median distance from the
  start;
- :func:`clip_norms`: per-update L2 norm clipping to a multiple of the round's median norm,
  applied before any rule (:func:`aggregate` composes them);
- :func:`bucket_means`: bucketing (Karimireddy, He & Jaggi 2022): the means of random buckets
  of ``s`` updates, drawn from the run's seed and the round, which the robust rule then
  combines (after norm clipping);
- :func:`exclude_outliers`: the outlier filters the coordinator applies before a robust rule
  (the balance of each update around the round's median, and each node's direction reputation
  over the run); the plain mean ignores them.

Sample weights buy no influence: the robust rules weigh every update equally, whatever
``samples_used`` a node claims (only the plain mean weighs by samples, and screening caps the
claim at what a node can process in a round).

The coordinate work runs in the native core when it is available (``median``,
``trimmed_mean``, ``squared_distances``, ``pairwise_squared_distances``,
``balance_statistics`` of :mod:`aumai_fedtrain._native`), else in the NumPy functions of this
module; both give the same bits, because every float operation and its order is specified here:

- values are read as float64 and signed zeros as ``+0.0`` (``x + 0.0``), so sorting is total;
- the median of an even count is ``(a + b) * 0.5`` of the two middle values;
- the trimmed mean sums the kept values in ascending order from ``0.0`` and divides by their
  count;
- a squared distance ``sum((x - y) ** 2)`` over one key accumulates the squared differences of
  the row-major values in 8 lanes (value ``i`` into lane ``i % 8``, in order), combines them as
  ``((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))``, and adds the keys' sums in key order
  from ``0.0``; the filters' dot products sum ``x * y`` in the same lanes and order;
- every mean of whole updates (Krum's, CenteredClip's steps) is the backend's
  ``weighted_average``, already bit-exact across backends.

Rules run after screening, so their input is finite; a non-finite value is a ``ValueError``
naming the rule, the key and the update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import numpy as np

from aumai_fedtrain import _fallback
from aumai_fedtrain._fallback import result_dtype
from aumai_fedtrain.aggregation import GradientAverager, update_weights
from aumai_fedtrain.backend import Backend, RunningSum, get_backend
from aumai_fedtrain.models import (
    AggregationConfig,
    LocalUpdate,
    NodeReputation,
    TensorMap,
    TrainingConfig,
)

__all__ = [
    "EXCLUSION",
    "LANES",
    "Exclusions",
    "RobustAggregator",
    "aggregate",
    "bucket_count",
    "bucket_means",
    "buckets",
    "centered_clip",
    "clip_norms",
    "exclude_outliers",
    "krum",
    "median",
    "trimmed_mean",
]

LANES = 8
"""Lanes of every sum of squares (see the module docstring)."""

_SEED_MODULUS = 1 << 128
_BUCKETS = 0xB0C4E7
"""The tag of the bucketing stream in its seed sequence ``(seed, tag, round)``."""


class Kernels(Protocol):
    """The coordinate work of the rules, native or NumPy (same bits)."""

    def median(self, updates: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]: ...

    def trimmed_mean(
        self, updates: Sequence[Mapping[str, np.ndarray]], trim: int
    ) -> dict[str, np.ndarray]: ...

    def squared_distances(
        self,
        updates: Sequence[Mapping[str, np.ndarray]],
        center: Mapping[str, np.ndarray] | None = None,
    ) -> list[float]: ...

    def pairwise_squared_distances(
        self, updates: Sequence[Mapping[str, np.ndarray]]
    ) -> list[list[float]]: ...

    def balance_statistics(
        self,
        updates: Sequence[Mapping[str, np.ndarray]],
        center: Mapping[str, np.ndarray] | None = None,
        reference: Mapping[str, np.ndarray] | None = None,
    ) -> list[tuple[int, int, float, float]]: ...


# --- the NumPy kernels (the fallback) ---------------------------------------------------------


def _stacked(updates: Sequence[Mapping[str, np.ndarray]], key: str) -> np.ndarray:
    """The updates' values of ``key`` as an ``(N, size)`` float64 array, signed zeros as +0.0."""
    return np.stack([np.asarray(u[key], dtype=np.float64).reshape(-1) for u in updates]) + 0.0


def _coordinatewise(
    updates: Sequence[Mapping[str, np.ndarray]], reduce: Callable[[np.ndarray], np.ndarray]
) -> dict[str, np.ndarray]:
    """``reduce`` of each key's sorted ``(N, size)`` values, in the first update's shapes."""
    first = updates[0]
    return {
        key: reduce(np.sort(_stacked(updates, key), axis=0)).reshape(np.shape(value))
        for key, value in first.items()
    }


def _median_of_sorted(ordered: np.ndarray) -> np.ndarray:
    half = len(ordered) // 2
    if len(ordered) % 2:
        return np.array(ordered[half])
    return np.asarray((ordered[half - 1] + ordered[half]) * 0.5)


def numpy_median(updates: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Coordinate-wise median (NumPy kernel; see the module docstring for the arithmetic)."""
    return _coordinatewise(updates, _median_of_sorted)


def numpy_trimmed_mean(
    updates: Sequence[Mapping[str, np.ndarray]], trim: int
) -> dict[str, np.ndarray]:
    """Per coordinate, the mean of the sorted values ``trim .. N - trim`` (NumPy kernel)."""

    def reduce(ordered: np.ndarray) -> np.ndarray:
        total = np.zeros(ordered.shape[1])
        for row in ordered[trim : len(ordered) - trim]:
            total = total + row
        return total / (len(ordered) - 2 * trim)

    return _coordinatewise(updates, reduce)


def _sum_of_squares(values: np.ndarray) -> float:
    """``sum(values ** 2)`` in :data:`LANES` lanes (see the module docstring)."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    return _lane_sum(flat * flat)


def _lane_sum(terms: np.ndarray) -> float:
    """The sum of the float64 ``terms`` in :data:`LANES` lanes (see the module docstring)."""
    padded = np.zeros(-(-terms.size // LANES) * LANES)
    padded[: terms.size] = terms
    if not padded.size:
        return 0.0
    # A running sum down the rows: each lane summed in order, as the native kernel does.
    lanes = np.cumsum(padded.reshape(-1, LANES), axis=0)[-1]
    low = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])
    high = (lanes[4] + lanes[5]) + (lanes[6] + lanes[7])
    return float(low + high)


def _squared_distance(x: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray] | None) -> float:
    total = 0.0
    for key, value in x.items():
        values = np.asarray(value, dtype=np.float64)
        if y is not None:
            values = values - np.asarray(y[key], dtype=np.float64)
        total = total + _sum_of_squares(values)
    return total


def numpy_squared_distances(
    updates: Sequence[Mapping[str, np.ndarray]],
    center: Mapping[str, np.ndarray] | None = None,
) -> list[float]:
    """Each update's squared L2 distance to ``center`` (its squared norm without one)."""
    return [_squared_distance(update, center) for update in updates]


def numpy_pairwise_squared_distances(
    updates: Sequence[Mapping[str, np.ndarray]],
) -> list[list[float]]:
    """The ``N x N`` symmetric matrix of squared L2 distances (zero diagonal)."""
    matrix = [[0.0] * len(updates) for _ in updates]
    for i, x in enumerate(updates):
        for j in range(i + 1, len(updates)):
            matrix[i][j] = matrix[j][i] = _squared_distance(x, updates[j])
    return matrix


def numpy_balance_statistics(
    updates: Sequence[Mapping[str, np.ndarray]],
    center: Mapping[str, np.ndarray] | None = None,
    reference: Mapping[str, np.ndarray] | None = None,
) -> list[tuple[int, int, float, float]]:
    """Per update: its values strictly below and strictly above ``center`` (0 without it; ties
    count on neither side), its dot product with ``reference`` (0.0 without it) and its squared
    norm, the sums in lanes as the squared distances'."""
    statistics = []
    for update in updates:
        below = above = 0
        dot = norm = 0.0
        for key, value in update.items():
            flat = np.asarray(value, dtype=np.float64).reshape(-1)
            if center is not None:
                middle = np.asarray(center[key], dtype=np.float64).reshape(-1)
                below += int(np.count_nonzero(flat < middle))
                above += int(np.count_nonzero(flat > middle))
            if reference is not None:
                dot = dot + _lane_sum(flat * np.asarray(reference[key], np.float64).reshape(-1))
            norm = norm + _sum_of_squares(flat)
        statistics.append((below, above, dot, norm))
    return statistics


class _NumpyKernels:
    median = staticmethod(numpy_median)
    trimmed_mean = staticmethod(numpy_trimmed_mean)
    squared_distances = staticmethod(numpy_squared_distances)
    pairwise_squared_distances = staticmethod(numpy_pairwise_squared_distances)
    balance_statistics = staticmethod(numpy_balance_statistics)


def kernels(backend: Backend) -> Kernels:
    """The coordinate kernels of ``backend``: the NumPy ones for the python backend."""
    if backend is cast(Backend, _fallback):
        return _NumpyKernels()
    return cast(Kernels, backend)


# --- the rules ----------------------------------------------------------------------------------


def _checked(
    rule: str, updates: Sequence[Mapping[str, np.ndarray]], backend: Backend
) -> list[dict[str, np.ndarray]]:
    """The updates as maps of arrays in the first update's key order, checked for the rules."""
    if not updates:
        raise ValueError(f"{rule}: cannot aggregate an empty list of updates")
    first = {key: np.asarray(value) for key, value in updates[0].items()}
    maps = []
    for index, update in enumerate(updates):
        if update.keys() != first.keys():
            raise ValueError(
                f"{rule}: update #{index} has keys {sorted(update)}, update #0 has "
                f"{sorted(first)} (robust rules need the same keys from every update)"
            )
        arrays = {key: np.asarray(update[key]) for key in first}
        for key, value in arrays.items():
            if value.shape != first[key].shape:
                raise ValueError(
                    f"{rule}: gradient {key!r} has shape {value.shape} in update #{index}, "
                    f"{first[key].shape} in update #0"
                )
        maps.append(arrays)
    for index, magnitudes in enumerate(backend.max_abs(maps)):
        for key, magnitude in zip(maps[index], magnitudes, strict=True):
            if not math.isfinite(magnitude):
                raise ValueError(
                    f"{rule}: gradient {key!r} of update #{index} has non-finite values "
                    "(rules run on screened, finite updates)"
                )
    return maps


def median(
    updates: Sequence[Mapping[str, np.ndarray]], backend: str | None = None
) -> dict[str, np.ndarray]:
    """Coordinate-wise median of ``updates`` (unweighted).

    Raises
    ------
    ValueError
        No updates, keys or shapes that differ between updates, or non-finite values.
    """
    chosen = get_backend(backend)
    maps = _checked("median", updates, chosen)
    return _in_carriers_dtype(kernels(chosen).median(maps), maps)


def check_trim_fraction(trim_fraction: float, count: int) -> int:
    """How many values per side a trimmed mean of ``count`` updates drops (``ValueError``)."""
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(
            f"trimmed_mean: trim fraction {trim_fraction!r} must be in [0, 0.5) "
            f"(N = {count} updates)"
        )
    return math.floor(trim_fraction * count)


def trimmed_mean(
    updates: Sequence[Mapping[str, np.ndarray]],
    trim_fraction: float,
    backend: str | None = None,
) -> dict[str, np.ndarray]:
    """Per coordinate, the mean after dropping the ``floor(trim_fraction * N)`` largest and
    smallest values (unweighted).

    Raises
    ------
    ValueError
        A trim fraction outside ``[0, 0.5)``, no updates, keys or shapes that differ, or
        non-finite values.
    """
    chosen = get_backend(backend)
    trim = check_trim_fraction(trim_fraction, len(updates))
    maps = _checked("trimmed_mean", updates, chosen)
    return _in_carriers_dtype(kernels(chosen).trimmed_mean(maps, trim), maps)


def check_krum(count: int, f: int, m: int | None) -> int:
    """How many updates multi-Krum selects from ``count`` (``ValueError`` when it cannot)."""
    if f < 0:
        raise ValueError(f"krum: f = {f} assumed attackers must be >= 0")
    if count < f + 3:
        raise ValueError(
            f"krum: N = {count} updates is too few for f = {f} assumed attackers (each score "
            f"sums the distances to the N - f - 2 nearest updates: needs N >= f + 3 = {f + 3})"
        )
    selected = count - f if m is None else m
    if not 1 <= selected <= count - f:
        raise ValueError(
            f"krum: m = {selected} selected updates must be in [1, N - f] = [1, {count - f}] "
            f"(N = {count}, f = {f})"
        )
    return selected


def krum_scores(distances: Sequence[Sequence[float]], f: int) -> list[float]:
    """Each update's Krum score: its ``N - f - 2`` smallest squared distances to the others,
    summed in ascending order from ``0.0``."""
    count = len(distances)
    scores = []
    for i, row in enumerate(distances):
        nearest = sorted(row[j] for j in range(count) if j != i)[: count - f - 2]
        score = 0.0
        for distance in nearest:
            score = score + distance
        scores.append(score)
    return scores


def krum_selection(distances: Sequence[Sequence[float]], f: int, m: int | None) -> list[int]:
    """Indices (ascending) of the ``m`` best-scored updates; ties go to the lower index."""
    selected = check_krum(len(distances), f, m)
    scores = krum_scores(distances, f)
    best = sorted(range(len(scores)), key=lambda i: (scores[i], i))[:selected]
    return sorted(best)


def krum(
    updates: Sequence[Mapping[str, np.ndarray]],
    f: int,
    m: int | None = None,
    backend: str | None = None,
) -> dict[str, np.ndarray]:
    """Multi-Krum: the unweighted mean of the ``m`` updates (default ``N - f``) with the lowest
    scores (:func:`krum_scores`); ``m = 1`` is Krum.

    Raises
    ------
    ValueError
        ``N < f + 3`` (naming the rule, N and f), ``m`` outside ``[1, N - f]``, no updates,
        keys or shapes that differ, or non-finite values.
    """
    chosen = get_backend(backend)
    check_krum(len(updates), f, m)
    maps = _checked("krum", updates, chosen)
    chosen_indices = krum_selection(kernels(chosen).pairwise_squared_distances(maps), f, m)
    picked = [maps[i] for i in chosen_indices]
    return _in_carriers_dtype(_mean(chosen, picked, [1.0] * len(picked)), maps)


def _mean(
    backend: Backend, maps: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """The backend's weighted mean of ``maps``, in their shapes (empty values keep theirs)."""
    mean = backend.weighted_average(maps, weights)
    return {key: mean[key].reshape(np.shape(value)) for key, value in maps[0].items()}


def _in_carriers_dtype(
    result: Mapping[str, np.ndarray], maps: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """``result`` rounded once to the widest float type of each key's carriers (as the mean)."""
    return {
        key: value.astype(result_dtype([update[key] for update in maps]), copy=False)
        for key, value in result.items()
    }


def _median_value(values: Sequence[float]) -> float:
    """The median of numbers, with the rules' arithmetic (even count: ``(a + b) * 0.5``)."""
    ordered = sorted(values)
    half = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[half]
    return (ordered[half - 1] + ordered[half]) * 0.5


def _check_centered_clip(tau: float | None, iterations: int, radius_multiple: float) -> None:
    """``ValueError`` naming the option when CenteredClip's parameters are invalid."""
    if tau is not None and not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"centered_clip: clip radius tau = {tau!r} must be finite and > 0")
    if iterations < 1:
        raise ValueError(f"centered_clip: iterations = {iterations} must be >= 1")
    if not (math.isfinite(radius_multiple) and radius_multiple > 0):
        raise ValueError(
            f"centered_clip: radius multiple {radius_multiple!r} must be finite and > 0"
        )


def centered_clip(
    updates: Sequence[Mapping[str, np.ndarray]],
    tau: float | None = None,
    iterations: int = 3,
    backend: str | None = None,
    *,
    radius_multiple: float = 1.0,
    start: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """CenteredClip: from ``v`` = ``start`` (default: the coordinate-wise median),
    ``iterations`` times ``v <- v + sum_i c_i (x_i - v) / N`` with
    ``c_i = min(1, tau / ||x_i - v||)``.

    Each step is computed as the weighted mean of ``x_1 .. x_N, v`` with weights
    ``c_1 .. c_N, N - sum(c)`` (the backend's ``weighted_average``). ``tau`` is the clip radius
    in L2 norm; None takes ``radius_multiple`` x the median of the distances ``||x_i - v||``
    from the start (the round's own scale) and keeps it for every iteration. ``start`` is
    typically the previous round's aggregate (Karimireddy et al. 2021); it must have the
    updates' keys and shapes.

    Raises
    ------
    ValueError
        A non-positive ``tau``, ``iterations`` or ``radius_multiple``, a ``start`` whose keys
        or shapes differ from the updates', no updates, keys or shapes that differ, or
        non-finite values.
    """
    _check_centered_clip(tau, iterations, radius_multiple)
    chosen = get_backend(backend)
    maps = _checked("centered_clip", updates, chosen)
    work = kernels(chosen)
    if start is None:
        center = work.median(maps)
    else:
        center = _like(start, maps[0], "centered_clip: the start")
    count = len(maps)
    radius = tau
    for _ in range(iterations):
        distances = [math.sqrt(d) for d in work.squared_distances(maps, center)]
        if radius is None:
            radius = radius_multiple * _median_value(distances)
        weights = [1.0 if d <= radius else radius / d for d in distances]
        kept = 0.0
        for weight in weights:
            kept = kept + weight
        center = _mean(chosen, [*maps, center], [*weights, max(0.0, count - kept)])
    return _in_carriers_dtype(center, maps)


def _like(
    tensors: Mapping[str, np.ndarray], first: Mapping[str, np.ndarray], name: str
) -> dict[str, np.ndarray]:
    """``tensors`` as float64 arrays in ``first``'s key order (``ValueError`` starting with
    ``name`` when they do not match the updates' keys and shapes, or are not finite)."""
    if tensors.keys() != first.keys():
        raise ValueError(f"{name} has keys {sorted(tensors)}, the updates {sorted(first)}")
    like = {}
    for key, value in first.items():
        array = np.asarray(tensors[key], dtype=np.float64)
        if array.shape != value.shape:
            raise ValueError(
                f"{name}'s {key!r} has shape {array.shape}, the updates' {value.shape}"
            )
        if not np.isfinite(array).all():
            raise ValueError(f"{name}'s {key!r} has non-finite values")
        like[key] = array
    return like


def bucket_count(count: int, size: int) -> int:
    """How many buckets :func:`buckets` makes of ``count`` updates: ``ceil(count / size)``."""
    return -(-count // size)


def buckets(count: int, size: int, seed: int, round_id: int) -> list[list[int]]:
    """The update indices ``0 .. count - 1`` in random buckets of ``size`` (the last one
    smaller when ``size`` does not divide ``count``), each bucket in ascending order.

    The permutation is drawn from ``(seed, round_id)`` alone, so a run, its resume and every
    backend bucket a round alike.
    """
    if size < 1:
        raise ValueError(f"bucketing: bucket size {size} must be >= 1")
    rng = np.random.default_rng(np.random.SeedSequence((seed % _SEED_MODULUS, _BUCKETS, round_id)))
    order = [int(i) for i in rng.permutation(count)]
    return [sorted(order[i : i + size]) for i in range(0, count, size)]


def bucket_means(
    updates: Sequence[Mapping[str, np.ndarray]],
    size: int,
    seed: int,
    round_id: int,
    backend: str | None = None,
) -> list[dict[str, np.ndarray]]:
    """Bucketing (Karimireddy, He & Jaggi 2022): the unweighted mean of each bucket of
    :func:`buckets`, in bucket order, as float64 maps (a bucket of one is its update).

    Raises
    ------
    ValueError
        A bucket size below 1, no updates, keys or shapes that differ, or non-finite values.
    """
    chosen = get_backend(backend)
    maps = _checked("bucketing", updates, chosen)
    return [
        _mean(chosen, [maps[i] for i in bucket], [1.0] * len(bucket))
        for bucket in buckets(len(maps), size, seed, round_id)
    ]


def clip_norms(
    updates: Sequence[Mapping[str, np.ndarray]], multiple: float, backend: str | None = None
) -> list[dict[str, np.ndarray]]:
    """Scale every update whose L2 norm exceeds ``multiple`` x the round's median norm down to
    that norm (each value times ``threshold / norm``); the others are returned as they are.

    Raises
    ------
    ValueError
        A non-positive ``multiple``, no updates, keys or shapes that differ, or non-finite
        values.
    """
    if not (math.isfinite(multiple) and multiple > 0):
        raise ValueError(f"norm clipping: multiple {multiple!r} must be finite and > 0")
    chosen = get_backend(backend)
    maps = _checked("norm clipping", updates, chosen)
    norms = [math.sqrt(d) for d in kernels(chosen).squared_distances(maps)]
    threshold = multiple * _median_value(norms)
    clipped = []
    for update, norm in zip(maps, norms, strict=True):
        if norm > threshold:
            scale = threshold / norm
            update = {
                key: np.asarray(value, dtype=np.float64) * scale for key, value in update.items()
            }
        clipped.append(update)
    return clipped


def aggregate(
    updates: Sequence[LocalUpdate],
    config: AggregationConfig,
    weights: Sequence[float],
    backend: str | None = None,
    *,
    seed: int = 0,
    previous: Mapping[str, np.ndarray] | None = None,
    median: Mapping[str, np.ndarray] | None = None,
) -> TensorMap:
    """The configured rule over ``updates``, after norm clipping when ``config.norm_clip`` is
    set, then bucketing when ``config.bucket_size > 1`` (buckets drawn from ``seed`` and the
    updates' round). ``weights`` are used by the mean alone (the robust rules are unweighted).

    ``previous`` is the previous round's aggregate: ``centered_clip`` starts from it when
    ``config.clip_start`` is ``"previous"``. It may be None (or empty) only in round 1, where
    the rule starts from the median.

    ``median`` is the coordinate-wise median of ``updates``' gradients when the caller has it
    already (:attr:`Exclusions.median`): the ``median`` rule returns
    it and ``centered_clip`` starts from it rather than computing it again. It is not used
    with norm clipping or bucketing, whose inputs are not the updates themselves.

    Raises
    ------
    ValueError
        ``clip_start = "previous"`` without ``previous`` after round 1, and the rules' errors.
    """
    gradients: list[Mapping[str, np.ndarray]] = [update.gradients for update in updates]
    if config.norm_clip is not None:
        gradients = list(clip_norms(gradients, config.norm_clip, backend))
    labels = [update.node_id for update in updates]
    if config.rule == "mean":
        return get_backend(backend).weighted_average(gradients, weights, labels)
    round_id = updates[0].round_id if updates else 0
    inputs = gradients
    if config.bucket_size > 1:
        inputs = list(bucket_means(gradients, config.bucket_size, seed, round_id, backend))
    if inputs is not gradients or config.norm_clip is not None:
        median = None  # (the median of other inputs)
    result = _robust_rule(inputs, config, round_id, previous, backend, median)
    return _in_carriers_dtype(result, gradients)


def _robust_rule(
    gradients: Sequence[Mapping[str, np.ndarray]],
    config: AggregationConfig,
    round_id: int,
    previous: Mapping[str, np.ndarray] | None,
    backend: str | None,
    known_median: Mapping[str, np.ndarray] | None,
) -> dict[str, np.ndarray]:
    """The configured robust rule (not the mean) over ``gradients``, whose coordinate-wise
    median is ``known_median`` when not None."""
    if config.rule == "median":
        return dict(known_median) if known_median is not None else median(gradients, backend)
    if config.rule == "trimmed_mean":
        return trimmed_mean(gradients, config.trim_fraction, backend)
    if config.rule == "krum":
        return krum(gradients, config.krum_f, config.krum_m, backend)
    start = known_median
    if config.clip_start == "previous":
        if previous:
            start = previous
        elif round_id > 1:
            raise ValueError(
                f"centered_clip: clip_start 'previous' needs the previous round's aggregate "
                f"in round {round_id} (none was given)"
            )
    return centered_clip(
        gradients,
        config.clip_radius,
        config.clip_iterations,
        backend,
        radius_multiple=config.clip_radius_multiple,
        start=start,
    )


@dataclass(frozen=True)
class Exclusions:
    """What the outlier filters (:func:`exclude_outliers`) decided for a round."""

    kept: list[LocalUpdate]
    """The updates the rule combines, in their order."""
    excluded: dict[str, str]
    """Node id -> one-line reason, for each update excluded this round."""
    reputation: dict[str, NodeReputation]
    """Every node's direction record after this round (the next ``GlobalState.reputation``)."""
    spared: dict[str, str] = field(default_factory=dict)
    """Node id -> reason, for the flagged updates kept because a majority is never excluded."""
    median: dict[str, np.ndarray] | None = None
    """The coordinate-wise median (float64) of :attr:`kept`, when the balance filter computed
    it and excluded nothing (else None): :func:`aggregate` takes it (``median=``) instead of
    computing it again."""


EXCLUSION = "excluded by robust aggregation: "
"""How every reason of :attr:`Exclusions.excluded` starts."""


def exclude_outliers(
    updates: Sequence[LocalUpdate],
    config: AggregationConfig,
    previous: Mapping[str, np.ndarray] | None = None,
    reputation: Mapping[str, NodeReputation] | None = None,
    backend: str | None = None,
) -> Exclusions:
    """The robust rules' outlier filters over a round's screened ``updates``.

    - Balance (sign statistics in the spirit of SignGuard, Xu et al. 2022): an update's
      balance is ``(below - above) / total``, its values strictly below and strictly above the
      round's coordinate-wise median over all keys. Honest updates scatter around the median
      (small balance); one built from the mean minus a multiple of the spread (ALIE) lies
      below it everywhere (balance 1). ``|balance| > config.balance_limit`` excludes it.
    - Direction reputation (learning from history, Karimireddy et al. 2021): from the second
      round on, each update's cosine with ``previous`` (the previous round's aggregate) is
      added to its node's record (an update of norm zero adds nothing, nor does any update
      when ``previous`` has other keys or shapes, as when a run without a model adds a key;
      the cosine is clamped to [-1, 1] against rounding and underflow); a node whose record
      holds at least ``config.reputation_warmup`` cosines of negative mean, i.e. whose updates
      push against the global model's direction of travel, is excluded. The record is updated
      before the decision and an excluded node keeps being scored, so it can recover.

    At most ``floor((N - 1) / 2)`` updates are excluded (fewer when multi-Krum would lack the
    ``f + 3`` updates or the ``m`` it needs): when more are flagged, those excluded
    are the ones flagged by balance, largest ``|balance|`` first, then those flagged by
    reputation alone, lowest mean cosine first (ties: the earlier update); the others are kept
    and listed in :attr:`Exclusions.spared`. Sample weights play no part. The plain ``mean``
    (and a config with both filters off) excludes nothing and keeps ``reputation`` as it is.

    Raises
    ------
    ValueError
        Updates whose keys or shapes differ, or non-finite values (in ``previous`` too).
    """
    records = dict(reputation or {})
    limit, warmup = config.balance_limit, config.reputation_warmup
    if config.rule == "mean" or not updates or (limit is None and warmup is None):
        return Exclusions(list(updates), {}, records)
    chosen = get_backend(backend)
    maps = _checked("outlier filters", [update.gradients for update in updates], chosen)
    work = kernels(chosen)
    center = work.median(maps) if limit is not None else None
    reference = None
    if warmup is not None and previous and _same_layout(previous, maps[0]):
        reference = _like(previous, maps[0], "reputation: the previous aggregate")
    statistics = work.balance_statistics(maps, center, reference)
    reference_norm = math.sqrt(work.squared_distances([reference])[0]) if reference else 0.0
    total = sum(value.size for value in maps[0].values())
    flagged: list[tuple[tuple[int, float, int], str, str]] = []
    for index, (update, (below, above, dot, squared)) in enumerate(
        zip(updates, statistics, strict=True)
    ):
        reasons = []
        rank: tuple[int, float, int] | None = None
        balance = (below - above) / total if total else 0.0
        if limit is not None and abs(balance) > limit:
            reasons.append(_balance_reason(below, above, total, balance, limit))
            rank = (0, -abs(balance), index)
        if warmup is not None:
            record = records.get(update.node_id, NodeReputation())
            if reference is not None and squared > 0 and reference_norm > 0:
                # Clamped: values so small that their squares underflow would otherwise give
                # a "cosine" far beyond 1, a shield of good record for later rounds.
                cosine = min(1.0, max(-1.0, dot / (math.sqrt(squared) * reference_norm)))
                record = NodeReputation(
                    cosine_sum=record.cosine_sum + cosine, rounds=record.rounds + 1
                )
                records[update.node_id] = record
            mean_cosine = record.cosine_sum / record.rounds if record.rounds else 0.0
            if record.rounds >= warmup and mean_cosine < 0:
                reasons.append(
                    f"its updates point against the global model (mean cosine "
                    f"{mean_cosine:.3f} over {record.rounds} rounds)"
                )
                rank = rank or (1, mean_cosine, index)
        if rank is not None:
            flagged.append((rank, update.node_id, EXCLUSION + "; ".join(reasons)))
    flagged.sort(key=lambda flag: flag[0])
    cap = _most_excluded(config, len(updates))
    chosen_flags = {node_id: reason for _, node_id, reason in flagged[:cap]}
    in_order = {u.node_id: chosen_flags[u.node_id] for u in updates if u.node_id in chosen_flags}
    return Exclusions(
        [update for update in updates if update.node_id not in chosen_flags],
        in_order,
        records,
        {node_id: reason for _, node_id, reason in flagged[cap:]},
        None if chosen_flags else center,  # (the median of every update: of kept, if all are)
    )


def _same_layout(tensors: Mapping[str, np.ndarray], first: Mapping[str, np.ndarray]) -> bool:
    """Whether ``tensors`` has exactly ``first``'s keys and shapes."""
    return tensors.keys() == first.keys() and all(
        np.shape(tensors[key]) == value.shape for key, value in first.items()
    )


def _most_excluded(config: AggregationConfig, count: int) -> int:
    """How many of ``count`` updates the filters may exclude: ``floor((count - 1) / 2)``, fewer
    when multi-Krum would not have the ``f + 3`` updates (or bucket means) and ``m`` it needs."""
    most = (count - 1) // 2
    while most > 0 and config.rule == "krum":
        try:
            check_krum(bucket_count(count - most, config.bucket_size), config.krum_f, config.krum_m)
        except ValueError:
            most -= 1
        else:
            break
    return most


def _balance_reason(below: int, above: int, total: int, balance: float, limit: float) -> str:
    """Why an update's balance excludes it, with the share of its values on the far side."""
    if balance > 0:
        return (
            f"{below / total:.0%} of its values below the round's median "
            f"(balance {balance:.2f} > limit {limit:g})"
        )
    return (
        f"{above / total:.0%} of its values above the round's median "
        f"(balance {balance:.2f} < -limit {limit:g})"
    )


class RobustAggregator:
    """The coordinator's aggregation strategy: the configured rule of ``config.aggregation``.

    The plain mean without norm clipping is :class:`GradientAverager` itself (its fused path),
    which the coordinator folds as updates arrive (:attr:`streams`, :meth:`running_sum`);
    everything else needs the round's updates at once and goes through :func:`aggregate`.

    Parameters
    ----------
    config
        The run's configuration (``aggregation`` and ``aggregation_weights``).
    backend
        ``"native"``, ``"python"`` or None for the default.
    num_nodes
        The run's node count: multi-Krum checks its ``f`` and ``m`` against it when given.
    """

    def __init__(
        self, config: TrainingConfig, backend: str | None = None, num_nodes: int | None = None
    ) -> None:
        self.config = config.aggregation
        self.weighting = config.aggregation_weights
        self.seed = config.seed
        self._backend = backend
        self._mean = GradientAverager(config.aggregation_weights, backend)
        if num_nodes is not None and self.config.rule == "krum":
            count = bucket_count(num_nodes, self.config.bucket_size)
            check_krum(count, self.config.krum_f, self.config.krum_m)

    @property
    def streams(self) -> bool:
        """Whether the rule can fold updates as they arrive (:meth:`running_sum`): the plain
        mean without norm clipping. The robust rules and norm clipping (which scales by the
        round's median norm) need every update of the round at once and collect them all."""
        return self.config.rule == "mean" and self.config.norm_clip is None

    def running_sum(self) -> RunningSum:
        """A new running sum of the backend, for a mean folded update by update (:attr:`streams`
        rules only; weights from :meth:`weights`)."""
        return get_backend(self._backend).WeightedSum()

    def exclude(
        self,
        updates: Sequence[LocalUpdate],
        previous: Mapping[str, np.ndarray] | None = None,
        reputation: Mapping[str, NodeReputation] | None = None,
    ) -> Exclusions:
        """:func:`exclude_outliers` with the run's config: ``previous`` is the previous round's
        aggregate, ``reputation`` the nodes' records (``GlobalState.reputation``)."""
        return exclude_outliers(updates, self.config, previous, reputation, self._backend)

    def weights(self, updates: Sequence[LocalUpdate]) -> list[float]:
        """The mean's weights of ``updates`` (``aggregation_weights``)."""
        return update_weights(updates, self.weighting)

    def average(
        self,
        updates: Sequence[LocalUpdate],
        previous: Mapping[str, np.ndarray] | None = None,
        median: Mapping[str, np.ndarray] | None = None,
    ) -> TensorMap:
        """Aggregate ``updates`` with the configured rule; ``previous`` is the previous round's
        aggregate (``GlobalState.global_weights``, which checkpoints keep), needed after round 1
        with ``clip_start = "previous"``; ``median``, when given, the updates' coordinate-wise
        median (see :func:`aggregate`)."""
        if self.streams:
            return self._mean.average(updates)
        return aggregate(
            updates,
            self.config,
            self.weights(updates),
            self._backend,
            seed=self.seed,
            previous=previous,
            median=median,
        )
