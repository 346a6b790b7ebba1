"""Compressed updates on the wire: what a node answers when the run compresses.

A train request whose ``compression`` names a codec (:class:`~aumai_fedtrain.network.wire.
TrainRequest`) is answered with ``application/x-safetensors`` whatever ``Accept`` says: the body
of :func:`aumai_fedtrain.compression.encode_body`, two tensors ``codes`` (``U8``: every
tensor's codes in the model's sorted key order) and ``scales`` (``F32``, blockwise codecs only),
with the ``__metadata__`` ``aumai-fedtrain: compressed-update/1``, ``node_id``, ``round_id``,
``loss``, ``samples_used``, ``codec`` and ``block_size``. Its signature covers those bytes as
sent (:func:`~aumai_fedtrain.network.auth.sign_body`).

The receiver knows the model, so it knows the exact size of an honest body's codes and scales:
:func:`compressed_limit` bounds the body before it is read, :func:`read_compressed` refuses one
of another codec or block size, or with other tensors or sizes, from its header alone, and
:func:`read_compressed_update` reads its codes and scales (refusing non-finite or negative
scales) into an :class:`~aumai_fedtrain.compression.EncodedUpdate` of the model's shapes and
dtypes, never decoded: the coordinator screens it from its codes and scales and folds it into
the streamed mean with ``fold_encoded``, dequantising inside the fold. :func:`decode_compressed`
gives its decoded values (what a round's list of updates, robust rules and ``HashVerifier``'s
canonical JSON digest see).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from aumai_fedtrain.compression import (
    Codec,
    Encoded,
    EncodedUpdate,
    code_bytes,
    decode_body,
    encode_body,
)
from aumai_fedtrain.models import LocalUpdate, TensorMap
from aumai_fedtrain.network.wire import (
    FORMAT_KEY,
    WireError,
    bounded_header,
    update_from_metadata,
    update_metadata,
)

__all__ = [
    "COMPRESSED_UPDATE_KIND",
    "MAX_COMPRESSED_HEADER_BYTES",
    "CodecMismatchError",
    "compressed_limit",
    "decode_compressed",
    "encode_compressed",
    "read_compressed",
    "read_compressed_update",
]

COMPRESSED_UPDATE_KIND = "compressed-update/1"
"""The ``aumai-fedtrain`` metadata of a compressed update's body."""
MAX_COMPRESSED_HEADER_BYTES = 64 * 1024
"""Largest header of a compressed body: two tensors and a few metadata strings."""
_HEADER_LENGTH_BYTES = 8
_SCALE_BYTES = 4
_RESERVED_NAME = "__metadata__"


class CodecMismatchError(WireError):
    """A compressed body of another codec or block size than the run's."""


def encode_compressed(update: LocalUpdate, encoded: Mapping[str, Encoded]) -> bytes:
    """The body of ``update`` whose gradients are ``encoded`` (see the module)."""
    return encode_body(encoded, update_metadata(update, COMPRESSED_UPDATE_KIND))


def _layout(model: TensorMap, codec: Codec) -> tuple[int, int]:
    """Bytes of the codes and number of scales of an update of ``model`` encoded by ``codec``."""
    codes = scales = 0
    for value in model.values():
        codes += code_bytes(codec, value.size, value.dtype)
        if codec.blockwise:
            scales += math.ceil(value.size / codec.block_size)
    return codes, scales


def compressed_limit(model: TensorMap, codec: Codec) -> int:
    """The largest body an honest update of ``model`` compressed by ``codec`` can need."""
    codes, scales = _layout(model, codec)
    return _HEADER_LENGTH_BYTES + MAX_COMPRESSED_HEADER_BYTES + codes + _SCALE_BYTES * scales


def read_compressed(body: bytes, model: TensorMap, codec: Codec) -> dict[str, str]:
    """The metadata of a compressed body, read from its header alone.

    Raises :class:`CodecMismatchError` for another codec or block size than ``codec``, and
    :class:`WireError` for a body that is not a compressed update of ``model``.
    """
    header = bounded_header(body, MAX_COMPRESSED_HEADER_BYTES)
    found = header.pop(_RESERVED_NAME, None)
    metadata: dict[str, str] = found if isinstance(found, dict) else {}
    kind = metadata.get(FORMAT_KEY)
    if kind != COMPRESSED_UPDATE_KIND:
        raise WireError(
            f"the answer is not a compressed update (metadata {FORMAT_KEY!r} is {kind!r}, "
            f"expected {COMPRESSED_UPDATE_KIND!r})"
        )
    sent = (metadata.get("codec"), metadata.get("block_size"))
    if sent != (codec.name, str(codec.block_size)):
        raise CodecMismatchError(
            f"update compressed with codec {sent[0]!r}, block size {sent[1]!r}; this run's "
            f"codec is {codec.name!r}, block size {codec.block_size}"
        )
    codes, scales = _layout(model, codec)
    wanted: dict[str, tuple[str, list[int]]] = {"codes": ("U8", [codes])}
    if codec.blockwise:
        wanted["scales"] = ("F32", [scales])
    given = {name: _entry(entry) for name, entry in header.items()}
    if given != wanted:
        raise WireError(
            f"the compressed body holds {_describe(given)}; an update of the model compressed "
            f"with {codec.name} holds {_describe(wanted)}"
        )
    return metadata


def _entry(entry: Any) -> tuple[Any, Any]:
    return (entry.get("dtype"), entry.get("shape")) if isinstance(entry, dict) else (None, None)


def _describe(tensors: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{name} {dtype} {shape}" for name, (dtype, shape) in sorted(tensors.items()))


def read_compressed_update(
    body: bytes, model: TensorMap, metadata: Mapping[str, str]
) -> EncodedUpdate:
    """The update of a body that :func:`read_compressed` accepted (its ``metadata``), still
    encoded: its codes and scales (one copy of the body's tensors) for ``model``'s shapes and
    dtypes; :class:`WireError` for a malformed body or bad scales."""
    try:
        encoded = decode_body(body, model)
    except Exception as exc:  # SafetensorError, a short piece: any failure on untrusted bytes
        raise WireError(f"malformed compressed body ({exc})") from None
    for key, tensor in encoded.items():
        if tensor.scales is not None and not (
            np.isfinite(tensor.scales).all() and (tensor.scales >= 0).all()
        ):
            raise WireError(f"tensor {key!r} has non-finite or negative scales")
    update = update_from_metadata(metadata, {})
    return EncodedUpdate(**dict(update), encoded=encoded)


def decode_compressed(body: bytes, model: TensorMap, metadata: Mapping[str, str]) -> LocalUpdate:
    """:func:`read_compressed_update`, decoded into ``model``'s dtypes."""
    return read_compressed_update(body, model, metadata).decoded()
