"""Integrity of updates: the canonical SHA-256 digest of a gradient map (and the wire digest)."""

from __future__ import annotations

import hmac
import string
from collections.abc import Mapping, Sequence
from typing import Any

from aumai_fedtrain.backend import Backend, get_backend
from aumai_fedtrain.models import LocalUpdate

_HEX_DIGITS = frozenset(string.hexdigits)


def normalize_digest(digest: str) -> str:
    """Return ``digest`` as 64 lowercase hex characters, or raise ``ValueError``."""
    cleaned = digest.strip().lower() if isinstance(digest, str) else None
    if cleaned is None or len(cleaned) != 64 or not _HEX_DIGITS.issuperset(cleaned):
        raise ValueError(f"not a SHA-256 hex digest (64 hex characters): {digest!r}")
    return cleaned


class HashVerifier:
    """Computes and checks the canonical SHA-256 digest of gradients.

    The digest is ``sha256(json.dumps(g, sort_keys=True))`` with arrays written as lists, so
    anyone can recompute it with the Python standard library.

    Parameters
    ----------
    backend
        ``"native"``, ``"python"`` or None for the default (see :mod:`aumai_fedtrain.backend`).
    """

    def __init__(self, backend: str | None = None) -> None:
        self._backend: Backend = get_backend(backend)

    def compute_hash(self, gradients: Mapping[str, Any]) -> str:
        """Hex SHA-256 digest of the canonical serialisation of ``gradients``."""
        return self._backend.canonical_hash(gradients)

    def compute_hashes(self, gradient_maps: Sequence[Mapping[str, Any]]) -> list[str]:
        """:meth:`compute_hash` of each map; the native backend hashes them on every core."""
        return self._backend.canonical_hashes(gradient_maps)

    def wire_digest(self, gradients: Mapping[str, Any]) -> str:
        """The binary wire digest of ``gradients`` that signatures cover
        (:mod:`aumai_fedtrain.digest`; not the canonical digest of :meth:`compute_hash`)."""
        return self._backend.wire_digest(gradients)

    def verify(self, update: LocalUpdate, expected_hash: str) -> bool:
        """Whether ``update.gradients`` hashes to ``expected_hash`` (either case accepted).

        The comparison takes constant time. A malformed ``expected_hash`` raises ``ValueError``.
        """
        expected = normalize_digest(expected_hash)
        return hmac.compare_digest(self.compute_hash(update.gradients), expected)

    def verify_all(
        self, updates: Sequence[LocalUpdate], expected_hashes: Sequence[str]
    ) -> list[bool]:
        """:meth:`verify` of each update against its hash, the updates hashed side by side.

        Raises ``ValueError`` for a malformed hash or a count that differs from the updates'.
        """
        if len(expected_hashes) != len(updates):
            raise ValueError(f"got {len(expected_hashes)} hashes for {len(updates)} updates")
        expected = [normalize_digest(digest) for digest in expected_hashes]
        actual = self.compute_hashes([update.gradients for update in updates])
        return [hmac.compare_digest(a, e) for a, e in zip(actual, expected, strict=True)]
