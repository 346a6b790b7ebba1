"""The wire digest: what update signatures cover.

Two digests, each for its job:

- the **canonical JSON digest** (:class:`~aumai_fedtrain.HashVerifier`, ``aumai-fedtrain hash``
  and ``verify``) is ``sha256(json.dumps(g, sort_keys=True))``: anyone recomputes it with the
  standard library, but it writes ~20 bytes of text per number first (~20 ms per 10^6 values
  natively, ~750 ms in Python);
- the **wire digest** (this module) is one SHA-256 pass over a binary layout of the tensors:
  ~2 GB/s on one core, the cost of reading the bytes. The HMAC signature of every update sent
  over the network covers it (:mod:`aumai_fedtrain.network.auth`).

Layout, version 1. Every ``u64`` is an unsigned 64-bit little-endian integer::

    offset  bytes  content
    0       30     b"aumai-fedtrain/wire-digest/v1\\n" (ASCII, ends with a newline)
    30      8      u64 number of entries
    then, per entry, in ascending order of the keys' UTF-8 bytes (code point order):
            8      u64 length of the key's UTF-8 bytes (lone surrogates as "surrogatepass")
            k      the key's UTF-8 bytes
            8      u64 length of the dtype name (3)
            3      dtype name: b"F64", b"F32", b"F16", b"I64" or b"U64" (safetensors names)
            8      u64 number of dimensions d (0 for a scalar)
            8*d    u64 per dimension, outermost first
            8      u64 length n of the data in bytes (element count times 8, 4 for F32,
                   2 for F16)
            n      the values in row-major (C) order, each little-endian

The dtype is the array's kind, kept: float32 arrays are ``F32``, float16 arrays ``F16``, other
float arrays ``F64`` (long double rounded), signed int arrays ``I64``, unsigned ``U64``;
lists and numbers are read as ``np.asarray(value, dtype=np.float64)`` and are ``F64``. For
example ``{"w": np.array([1.5], dtype=np.float32)}`` is the 30-byte prefix, then
``01 00 00 00 00 00 00 00`` (one entry), ``01 00 .. 00 77`` (the key), ``03 00 .. 00 46 33 32``
(``F32``), ``01 00 .. 00 01 00 .. 00`` (one dimension of 1), ``04 00 .. 00 00 00 c0 3f`` (4
bytes of data). The digest is the lowercase hex SHA-256 of those bytes, recomputable with
``hashlib`` in a dozen lines (``aumai_fedtrain._fallback.wire_digest`` is that reference).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aumai_fedtrain._fallback import WIRE_DIGEST_MAGIC
from aumai_fedtrain.backend import get_backend

__all__ = ["WIRE_DIGEST_MAGIC", "WIRE_DIGEST_VERSION", "wire_digest"]

WIRE_DIGEST_VERSION = 1
"""The version of the layout above, the ``v1`` of :data:`WIRE_DIGEST_MAGIC`."""


def wire_digest(gradients: Mapping[str, Any], backend: str | None = None) -> str:
    """SHA-256 hex digest of the wire layout of ``gradients`` (see the module).

    ``backend`` is ``"native"``, ``"python"`` or None for the default; both give the same
    digest. Raises ``TypeError`` for a non-mapping, a non-str key or non-numeric values, and
    ``ValueError`` for a ragged nested list, naming the key.
    """
    return get_backend(backend).wire_digest(gradients)
