"""Aggregation of node updates: pure functions plus the :class:`GradientAverager` front."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from aumai_fedtrain.backend import Backend, get_backend
from aumai_fedtrain.models import LocalUpdate, TensorMap

Weighting = Literal["samples", "uniform"]


def update_weights(updates: Sequence[LocalUpdate], weighting: Weighting) -> list[float]:
    """Per-update weights: ``samples_used`` (FedAvg, DiLoCo non-i.i.d.) or uniform."""
    if weighting == "samples":
        return [float(update.samples_used) for update in updates]
    if weighting == "uniform":
        return [1.0] * len(updates)
    raise ValueError(f"unknown weighting {weighting!r}: expected 'samples' or 'uniform'")


def average_updates(
    updates: Sequence[LocalUpdate],
    weighting: Weighting = "samples",
    backend: Backend | None = None,
) -> TensorMap:
    """Per-key weighted mean of the updates' gradients, in float64.

    Each key is averaged over the updates that carry a non-empty value for it; a key that no
    update carries non-empty maps to an empty array. Both backends compute
    ``sum(w_i * x_i) / sum(w_i)`` by the same sequence of roundings (see
    ``aumai_fedtrain._fallback.weighted_average``), so their results are bit for bit equal.

    Raises
    ------
    ValueError
        ``Cannot average an empty list of updates.``, shapes that differ for one key (naming the
        key and nodes), all-zero weights for a key, or sample counts whose total overflows
        float64.
    """
    chosen = backend if backend is not None else get_backend()
    return chosen.weighted_average(
        [update.gradients for update in updates],
        update_weights(updates, weighting),
        [update.node_id for update in updates],
    )


def weighted_mean_loss(updates: Sequence[LocalUpdate]) -> float:
    """Mean of the updates' losses weighted by samples (uniform when no samples were used)."""
    losses = np.array([update.loss for update in updates], dtype=np.float64)
    samples = np.array([update.samples_used for update in updates], dtype=np.float64)
    if samples.sum() > 0:
        return float(np.dot(losses, samples) / samples.sum())
    return float(losses.mean())


class GradientAverager:
    """Averages :class:`LocalUpdate` gradients per parameter key.

    Parameters
    ----------
    weighting
        ``"samples"`` (default) weights each update by ``samples_used``; ``"uniform"`` gives
        every update the same weight.
    backend
        ``"native"``, ``"python"`` or None for the default.
    """

    def __init__(self, weighting: Weighting = "samples", backend: str | None = None) -> None:
        update_weights([], weighting)  # validates the name
        self.weighting: Weighting = weighting
        self._backend = get_backend(backend)

    def average(self, updates: Sequence[LocalUpdate]) -> TensorMap:
        """Average ``updates``; raises ``ValueError`` for an empty list."""
        return average_updates(updates, self.weighting, self._backend)
