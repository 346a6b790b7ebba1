"""Authentication of updates (HMAC-SHA256 by the node's key) and of the coordinator (a token).

Every node shares a secret key with the coordinator. It signs each update with
``HMAC-SHA256(key, message)`` where ``message`` is the UTF-8 of::

    json.dumps({"v": 2, "node_id": ..., "round_id": ..., "samples_used": ..., "loss": ...,
                "gradients_wire_sha256": ..., "nonce": ...}, sort_keys=True, separators=(",", ":"))

``gradients_wire_sha256`` is the wire digest of the gradients (:mod:`aumai_fedtrain.digest`:
one SHA-256 pass over their names, dtypes, shapes and little-endian bytes) and ``nonce`` the
coordinator's one-time value of the request (``""`` when it sent none), so a signature covers
every number the coordinator uses and cannot be replayed into another request. The signature
travels as ``v2=<hex HMAC>``: its version, then the MAC. The coordinator recomputes the digest
from the gradients it received and compares signatures in constant time.

A compressed update (:mod:`~aumai_fedtrain.network.compressed`) travels as its safetensors
body of codes and scales, and its signature covers those bytes as sent: the message is::

    json.dumps({"v": 2, "kind": "compressed-update", "node_id": ..., "round_id": ...,
                "body_sha256": ..., "nonce": ...}, sort_keys=True, separators=(",", ":"))

with ``body_sha256`` the hex SHA-256 of the body (which holds the loss and samples in its
metadata), so the coordinator checks it in one pass over the bytes received, before decoding
anything. Its keys differ from an uncompressed update's message, so neither signature can
pass for the other.

Signature version 1 (aumai-fedtrain 0.2: a bare hex MAC over ``"v": 1`` and the canonical JSON
digest, ``gradients_sha256``) cost two JSON renderings of every update, more than moving its
bytes; a signature of another version than :data:`SIGNATURE_VERSION` is refused with a
:class:`SignatureVersionError` naming both versions. Nodes accept training requests only with
the coordinator's bearer token.

Keys and tokens are text (surrounding whitespace removed) of at least
:data:`MIN_SECRET_CHARS` characters, e.g. the output of ``openssl rand -hex 32``; a token is
printable ASCII, since it travels in an HTTP header. A warning (once per file) names a secret
file that group or others may read, and a secret of less than :data:`MIN_SECRET_BYTES` bytes of
entropy (hex text counts half a byte per character).

A node trains only on a request signed with its key (unless it runs with
``--allow-unsigned-requests``): before each ``POST /train`` the coordinator fetches a one-time
nonce from the node (``GET /nonce``) and sends ``HMAC-SHA256(key, message)`` in
``X-Fedtrain-Request-Signature``, where ``message`` is the UTF-8 of::

    json.dumps({"v": 1, "kind": "train-request", "node_id": ..., "round_id": ...,
                "node_nonce": ..., "nonce": ..., "body_sha256": ...}, sort_keys=True,
               separators=(",", ":"))

``node_nonce`` is the node's nonce (``X-Fedtrain-Node-Nonce``, used once), ``nonce`` the
coordinator's (``X-Fedtrain-Nonce``), ``round_id`` the request's round (``X-Fedtrain-Round``)
and ``body_sha256`` the hex SHA-256 of the request body as sent. So neither a holder of the
token alone nor a replay of a captured request can make a node train or change its state.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import string
from pathlib import Path

from aumai_fedtrain.inputs import read_text_file
from aumai_fedtrain.models import LocalUpdate
from aumai_fedtrain.verification import HashVerifier

__all__ = [
    "MAX_NONCE_CHARS",
    "MIN_SECRET_BYTES",
    "MIN_SECRET_CHARS",
    "NODE_NONCE_HEADER",
    "NONCE_HEADER",
    "REQUEST_SIGNATURE_HEADER",
    "ROUND_HEADER",
    "SIGNATURE_HEADER",
    "SIGNATURE_VERSION",
    "SecretError",
    "SignatureVersionError",
    "check_nonce",
    "check_token",
    "load_secret",
    "new_nonce",
    "secret_from_text",
    "sign_body",
    "sign_request",
    "sign_update",
    "signature_version",
    "tokens_equal",
    "verify_body",
    "verify_request",
    "verify_update",
    "warn_if_readable",
]

logger = logging.getLogger("aumai_fedtrain.network")

MIN_SECRET_CHARS = 32
MIN_SECRET_BYTES = 32
"""Below this estimated entropy a secret is accepted with a warning."""
SIGNATURE_HEADER = "X-Fedtrain-Signature"
NONCE_HEADER = "X-Fedtrain-Nonce"
NODE_NONCE_HEADER = "X-Fedtrain-Node-Nonce"
ROUND_HEADER = "X-Fedtrain-Round"
REQUEST_SIGNATURE_HEADER = "X-Fedtrain-Request-Signature"
MAX_NONCE_CHARS = 128
SIGNATURE_VERSION = 2
"""The version of the update signatures this side makes and accepts."""
_SIGNED_DIGESTS = {1: "the canonical JSON digest", 2: "the binary wire digest"}
_MESSAGE_VERSION = 1
"""The version of the request signatures (their message's "v")."""
_HEX_DIGITS = frozenset(string.hexdigits)
_TOKEN_CHARS = frozenset(string.printable) - frozenset("\t\n\r\x0b\x0c")
_warned: set[tuple[str, str]] = set()


class SecretError(ValueError):
    """A key or token that cannot be used: unreadable, empty, too short or not ASCII."""


class SignatureVersionError(ValueError):
    """A signature of another version than :data:`SIGNATURE_VERSION` (a peer of another
    aumai-fedtrain version); the message names both versions."""


def secret_from_text(
    text: str, what: str, *, token: bool = False, source: str | None = None
) -> bytes:
    """The secret held by ``text`` (stripped), or :class:`SecretError` naming ``what``.

    ``token=True`` also requires printable ASCII (a token travels in an HTTP header). A secret
    of less than :data:`MIN_SECRET_BYTES` bytes of entropy is accepted with a warning naming
    ``source`` (default: ``what``).
    """
    cleaned = text.strip()
    if len(cleaned) < MIN_SECRET_CHARS:
        raise SecretError(
            f"{what} has {len(cleaned)} characters; use at least {MIN_SECRET_CHARS} "
            "(e.g. the output of: openssl rand -hex 32)"
        )
    if token:
        check_token(cleaned, what)
    entropy = len(cleaned) // 2 if _HEX_DIGITS.issuperset(cleaned) else len(cleaned)
    if entropy < MIN_SECRET_BYTES:
        named = source or what
        _warn_once(
            named,
            f"{named} holds about {entropy} bytes of entropy; use at least {MIN_SECRET_BYTES} "
            "(e.g. the output of: openssl rand -hex 32)",
        )
    return cleaned.encode("utf-8")


def check_token(token: str, what: str = "token") -> str:
    """Return ``token`` when it is printable ASCII, else raise :class:`SecretError`."""
    if not _TOKEN_CHARS.issuperset(token):
        raise SecretError(
            f"{what} must be printable ASCII (it is sent in an HTTP header); use e.g. the "
            "output of: openssl rand -hex 32"
        )
    return token


def load_secret(path: str | Path, what: str = "key") -> bytes:
    """Read a key or token file, or raise :class:`SecretError` with one line saying why.

    Warns (once per file) when group or others may read the file.
    """
    text = read_text_file(path, what, SecretError)
    label = f"{what} file {str(path)!r}"
    secret = secret_from_text(text, label, token=what == "token")
    warn_if_readable(path, label)
    return secret


def warn_if_readable(path: str | Path, label: str) -> None:
    """Warn (once per ``label``) when group or others may read the secret file ``path``."""
    if os.name != "posix":
        return
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        _warn_once(
            label,
            f"{label} may be read by group or others (mode {stat.filemode(mode)}); "
            f"run: chmod 600 {str(path)!r}",
        )


def _warn_once(subject: str, message: str) -> None:
    if (subject, message) not in _warned:
        _warned.add((subject, message))
        logger.warning("%s", message)


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


def _message(update: LocalUpdate, wire_digest: str, nonce: str) -> bytes:
    fields = {
        "v": SIGNATURE_VERSION,
        "node_id": update.node_id,
        "round_id": update.round_id,
        "samples_used": update.samples_used,
        "loss": update.loss,
        "gradients_wire_sha256": wire_digest,
        "nonce": nonce,
    }
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("utf-8")


def sign_update(
    key: bytes, update: LocalUpdate, nonce: str = "", verifier: HashVerifier | None = None
) -> str:
    """The signature of ``update`` for the request with ``nonce``: ``v2=<hex HMAC-SHA256>``.

    ``verifier`` picks the backend that computes the wire digest (the default one when None).
    """
    digest = (verifier or HashVerifier()).wire_digest(update.gradients)
    mac = hmac.new(key, _message(update, digest, nonce), hashlib.sha256).hexdigest()
    return f"v{SIGNATURE_VERSION}={mac}"


def signature_version(signature: str) -> int | None:
    """The version of a signature: ``N`` for ``vN=<hex>``, 1 for a bare 64-digit hex MAC (as
    aumai-fedtrain 0.2 sends), None when it is neither."""
    text = signature.strip().lower()
    if len(text) == 64 and _HEX_DIGITS.issuperset(text):
        return 1
    version, sep, mac = text.partition("=")
    if sep and version[:1] == "v" and version[1:].isdigit() and version[1:].isascii():
        return int(version[1:]) if mac else None
    return None


def verify_update(
    key: bytes,
    update: LocalUpdate,
    signature: str,
    nonce: str = "",
    verifier: HashVerifier | None = None,
) -> bool:
    """Whether ``signature`` is ``update``'s signature by ``key`` (constant-time comparison).

    Raises :class:`SignatureVersionError` for a signature of another version (one line that
    names both versions); a malformed signature is simply not valid.
    """
    _check_version(signature)
    return _same_signature(sign_update(key, update, nonce, verifier), signature)


def _check_version(signature: str) -> None:
    """Raise :class:`SignatureVersionError` for a signature of another version."""
    version = signature_version(signature)
    if version is not None and version != SIGNATURE_VERSION:
        signed = _SIGNED_DIGESTS.get(version, "an unknown digest")
        raise SignatureVersionError(
            f"signature version {version} (over {signed}) is not accepted: this side speaks "
            f"signature version {SIGNATURE_VERSION} (over {_SIGNED_DIGESTS[SIGNATURE_VERSION]}); "
            "run the same aumai-fedtrain version on the coordinator and the nodes"
        )


def _same_signature(expected: str, given: str) -> bool:
    """Constant-time comparison of a received signature with the expected one."""
    return hmac.compare_digest(
        expected.encode("ascii"), given.strip().lower().encode("utf-8", "replace")
    )


def _body_message(node_id: str, round_id: int, body: bytes, nonce: str) -> bytes:
    fields = {
        "v": SIGNATURE_VERSION,
        "kind": "compressed-update",
        "node_id": node_id,
        "round_id": round_id,
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "nonce": nonce,
    }
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("utf-8")


def sign_body(key: bytes, node_id: str, round_id: int, body: bytes, nonce: str = "") -> str:
    """The signature of a compressed update's ``body`` (as sent) by node ``node_id`` for
    ``round_id`` and the request with ``nonce``: ``v2=<hex HMAC-SHA256>`` (see the module)."""
    mac = hmac.new(key, _body_message(node_id, round_id, body, nonce), hashlib.sha256)
    return f"v{SIGNATURE_VERSION}={mac.hexdigest()}"


def verify_body(
    key: bytes, node_id: str, round_id: int, body: bytes, signature: str, nonce: str = ""
) -> bool:
    """Whether ``signature`` is :func:`sign_body` of ``body`` (constant-time comparison).

    Raises :class:`SignatureVersionError` as :func:`verify_update` does.
    """
    _check_version(signature)
    return _same_signature(sign_body(key, node_id, round_id, body, nonce), signature)


def tokens_equal(given: str, expected: bytes) -> bool:
    """Constant-time comparison of a presented token with the expected one."""
    return hmac.compare_digest(given.encode("utf-8"), expected)


def _request_message(
    node_id: str, round_id: int, node_nonce: str, nonce: str, body_sha256: str
) -> bytes:
    fields = {
        "v": _MESSAGE_VERSION,
        "kind": "train-request",
        "node_id": node_id,
        "round_id": round_id,
        "node_nonce": node_nonce,
        "nonce": nonce,
        "body_sha256": body_sha256,
    }
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("utf-8")


def sign_request(
    key: bytes, node_id: str, round_id: int, node_nonce: str, nonce: str, body_sha256: str
) -> str:
    """The hex HMAC-SHA256, by ``key``, of a ``POST /train`` request to ``node_id``.

    ``node_nonce`` is the node's one-time nonce (from ``GET /nonce``), ``nonce`` the
    coordinator's and ``body_sha256`` the hex SHA-256 of the body as sent (see the module doc).
    """
    message = _request_message(node_id, round_id, node_nonce, nonce, body_sha256)
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def verify_request(
    key: bytes,
    node_id: str,
    round_id: int,
    node_nonce: str,
    nonce: str,
    body_sha256: str,
    signature: str,
) -> bool:
    """Whether ``signature`` is :func:`sign_request` of the request (constant-time)."""
    expected = sign_request(key, node_id, round_id, node_nonce, nonce, body_sha256)
    given = signature.strip().lower().encode("utf-8", "replace")
    return hmac.compare_digest(expected.encode("ascii"), given)
