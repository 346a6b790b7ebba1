"""Authentication of updates (HMAC-SHA256 by the node's key) and of the coordinator (a token).

Every node shares a secret key with the coordinator. It signs each update with
``HMAC-SHA256(key, message)`` where ``message`` is the UTF-8 of::

    json.dumps({"v": 1, "node_id": ..., "round_id": ..., "samples_used": ..., "loss": ...,
                "gradients_sha256": ..., "nonce": ...}, sort_keys=True, separators=(",", ":"))

``gradients_sha256`` is the canonical digest of :class:`~aumai_fedtrain.HashVerifier` and
``nonce`` the coordinator's one-time value of the request (``""`` when it sent none), so a
signature covers every number the coordinator uses and cannot be replayed into another request.
The coordinator recomputes the digest from the gradients it received and compares signatures in
constant time. Nodes accept training requests only with the coordinator's bearer token.

Keys and tokens are text (surrounding whitespace removed) of at least
:data:`MIN_SECRET_CHARS` characters, e.g. the output of ``openssl rand -hex 32``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from pathlib import Path

from aumai_fedtrain.inputs import read_text_file
from aumai_fedtrain.models import LocalUpdate
from aumai_fedtrain.verification import HashVerifier

__all__ = [
    "MAX_NONCE_CHARS",
    "MIN_SECRET_CHARS",
    "NONCE_HEADER",
    "SIGNATURE_HEADER",
    "SecretError",
    "check_nonce",
    "load_secret",
    "new_nonce",
    "secret_from_text",
    "sign_update",
    "tokens_equal",
    "verify_update",
]

MIN_SECRET_CHARS = 32
SIGNATURE_HEADER = "X-Fedtrain-Signature"
NONCE_HEADER = "X-Fedtrain-Nonce"
MAX_NONCE_CHARS = 128
_MESSAGE_VERSION = 1


class SecretError(ValueError):
    """A key or token that cannot be used: unreadable, empty or too short."""


def secret_from_text(text: str, what: str) -> bytes:
    """The secret held by ``text`` (stripped), or :class:`SecretError` naming ``what``."""
    cleaned = text.strip()
    if len(cleaned) < MIN_SECRET_CHARS:
        raise SecretError(
            f"{what} has {len(cleaned)} characters; use at least {MIN_SECRET_CHARS} "
            "(e.g. the output of: openssl rand -hex 32)"
        )
    return cleaned.encode("utf-8")


def load_secret(path: str | Path, what: str = "key") -> bytes:
    """Read a key or token file, or raise :class:`SecretError` with one line saying why."""
    text = read_text_file(path, what, SecretError)
    return secret_from_text(text, f"{what} file {str(path)!r}")


def new_nonce() -> str:
    """A fresh one-time value for a request (32 hex characters)."""
    return secrets.token_hex(16)


def check_nonce(nonce: str) -> str:
    """Return ``nonce`` when it is at most :data:`MAX_NONCE_CHARS` hex digits, else raise."""
    if len(nonce) > MAX_NONCE_CHARS or any(c not in "0123456789abcdef" for c in nonce):
        raise ValueError(
            f"{NONCE_HEADER} must be at most {MAX_NONCE_CHARS} lowercase hex characters"
        )
    return nonce


def _message(update: LocalUpdate, gradients_sha256: str, nonce: str) -> bytes:
    fields = {
        "v": _MESSAGE_VERSION,
        "node_id": update.node_id,
        "round_id": update.round_id,
        "samples_used": update.samples_used,
        "loss": update.loss,
        "gradients_sha256": gradients_sha256,
        "nonce": nonce,
    }
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("utf-8")


def sign_update(
    key: bytes, update: LocalUpdate, nonce: str = "", verifier: HashVerifier | None = None
) -> str:
    """The hex HMAC-SHA256 signature of ``update`` for the request with ``nonce``."""
    digest = (verifier or HashVerifier()).compute_hash(update.gradients)
    return hmac.new(key, _message(update, digest, nonce), hashlib.sha256).hexdigest()


def verify_update(
    key: bytes,
    update: LocalUpdate,
    signature: str,
    nonce: str = "",
    verifier: HashVerifier | None = None,
) -> bool:
    """Whether ``signature`` is ``update``'s signature by ``key`` (constant-time comparison)."""
    expected = sign_update(key, update, nonce, verifier).encode("ascii")
    return hmac.compare_digest(expected, signature.strip().lower().encode("utf-8", "replace"))


def tokens_equal(given: str, expected: bytes) -> bool:
    """Constant-time comparison of a presented token with the expected one."""
    return hmac.compare_digest(given.encode("utf-8"), expected)
