"""The built-in dataset: a seeded Gaussian-mixture classification task, sharded over nodes.

Every class is a mixture of ``clusters_per_class`` Gaussian blobs with random centres in
``num_features`` dimensions and a shared isotropic spread ``cluster_std``. The classes are
multi-modal, so a linear model fits them poorly while an MLP keeps improving for many rounds, and
blobs of different classes overlap, so no model beats the Bayes-optimal loss
(:meth:`SyntheticTask.bayes_loss`).

All randomness is derived from ``(seed, stream, node, round)`` (see
:mod:`aumai_fedtrain.simulation.seeding`), so any node's shard, any round's mini-batches and the
evaluation set can be regenerated on demand, in any order, bit for bit. Nothing per node is kept
except a small bounded cache of recently used shards, so a run with thousands of virtual nodes
costs memory for the model and a few shards only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from aumai_fedtrain.models import SimulationConfig
from aumai_fedtrain.simulation.seeding import Stream, derive_rng

__all__ = ["SyntheticTask"]


class SyntheticTask:
    """A seeded Gaussian-mixture classification task split across virtual nodes.

    Parameters
    ----------
    config
        Dataset settings (features, classes, clusters, spread, shard size, Dirichlet alpha).
    seed
        The run's seed; the task, the shards and the batches are functions of it.
    cache_size
        How many generated shards to keep (least recently used are dropped first).
    """

    def __init__(self, config: SimulationConfig, seed: int, *, cache_size: int = 16) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.config = config
        self.seed = seed
        self._cache_size = cache_size
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        rng = derive_rng(seed, Stream.CENTRES)
        self.centres = rng.standard_normal(
            (config.num_classes, config.clusters_per_class, config.num_features)
        )
        self._eval: tuple[np.ndarray, np.ndarray] | None = None

    def label_distribution(self, node: int) -> np.ndarray:
        """Class probabilities of ``node``'s shard: uniform, or Dirichlet(alpha) when set."""
        return self._proportions(self._shard_rng(node))

    def shard(self, node: int) -> tuple[np.ndarray, np.ndarray]:
        """``(features, labels)`` of ``node``'s private shard (``samples_per_node`` rows)."""
        cached = self._cache.get(node)
        if cached is not None:
            self._cache.move_to_end(node)
            return cached
        rng = self._shard_rng(node)
        labels = rng.choice(
            self.config.num_classes, size=self.config.samples_per_node, p=self._proportions(rng)
        )
        data = (self._features(rng, labels), labels)
        if self._cache_size:
            self._cache[node] = data
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return data

    def eval_set(self) -> tuple[np.ndarray, np.ndarray]:
        """The held-out evaluation set: ``eval_samples`` rows with uniformly drawn classes."""
        if self._eval is None:
            rng = derive_rng(self.seed, Stream.EVAL)
            labels = rng.integers(self.config.num_classes, size=self.config.eval_samples)
            self._eval = (self._features(rng, labels), labels)
        return self._eval

    def batches(
        self, node: int, round_id: int, steps: int, batch_size: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``steps`` mini-batches of ``batch_size`` rows of ``node``'s shard for a round.

        The rows are drawn without replacement, in epochs: every full pass over the shard is a
        fresh permutation, and what remains is a draw without replacement. The draw depends on
        ``(seed, node, round_id)`` only.
        """
        features, labels = self.shard(node)
        total = steps * batch_size
        size = len(labels)
        rng = derive_rng(self.seed, Stream.BATCHES, node, round_id)
        full_passes, rest = divmod(total, size)
        parts = [rng.permutation(size) for _ in range(full_passes)]
        if rest:
            parts.append(rng.choice(size, size=rest, replace=False))
        order = np.concatenate(parts)
        for start in range(0, total, batch_size):
            rows = order[start : start + batch_size]
            yield features[rows], labels[rows]

    def bayes_loss(self, features: np.ndarray, labels: np.ndarray) -> float:
        """Mean cross-entropy of the Bayes-optimal classifier under uniform class priors.

        This is the floor no model can beat on the evaluation set (which has uniform classes).
        """
        std = self.config.cluster_std
        # squared distances of every row to every centre: (rows, classes, clusters)
        diff = features[:, None, None, :] - self.centres[None]
        log_density = -0.5 * np.einsum("nckf,nckf->nck", diff, diff) / std**2
        log_class = _logsumexp(log_density, axis=2)
        log_posterior = log_class - _logsumexp(log_class, axis=1)[:, None]
        return float(-log_posterior[np.arange(len(labels)), labels].mean())

    def _shard_rng(self, node: int) -> np.random.Generator:
        if node < 0:
            raise ValueError(f"node index must be >= 0, got {node}")
        return derive_rng(self.seed, Stream.SHARD, node)

    def _proportions(self, shard_rng: np.random.Generator) -> np.ndarray:
        num_classes = self.config.num_classes
        alpha = self.config.dirichlet_alpha
        if alpha is None:
            return np.full(num_classes, 1.0 / num_classes)
        return shard_rng.dirichlet(np.full(num_classes, alpha))

    def _features(self, rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
        clusters = rng.integers(self.config.clusters_per_class, size=len(labels))
        noise = rng.standard_normal((len(labels), self.config.num_features))
        features: np.ndarray = self.centres[labels, clusters] + self.config.cluster_std * noise
        return features


def _logsumexp(values: np.ndarray, axis: int) -> np.ndarray:
    peak = values.max(axis=axis, keepdims=True)
    result: np.ndarray = np.log(np.exp(values - peak).sum(axis=axis)) + np.squeeze(peak, axis=axis)
    return result
