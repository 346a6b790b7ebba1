"""Derivation of every random stream of the simulation from ``(seed, stream, node, round)``."""

from __future__ import annotations

from enum import IntEnum

import numpy as np

__all__ = ["Stream", "derive_rng"]

_SEED_MODULUS = 1 << 128


class Stream(IntEnum):
    """Tags that keep the random streams of different purposes independent."""

    CENTRES = 0
    SHARD = 1
    EVAL = 2
    BATCHES = 3
    INIT = 4
    ATTACK = 5


def derive_rng(seed: int, stream: Stream, *keys: int) -> np.random.Generator:
    """A generator seeded from ``(seed, stream, *keys)``; negative seeds are taken mod 2**128.

    Parameters
    ----------
    seed
        The run's seed (any int).
    stream
        What the numbers are for.
    keys
        Non-negative integers such as ``(node, round)``.
    """
    return np.random.default_rng(np.random.SeedSequence((seed % _SEED_MODULUS, int(stream), *keys)))
