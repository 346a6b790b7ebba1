"""Bodies of ``POST /train``: JSON (the user guide's form) or safetensors, chosen by media type.

A request carries the round id and the global model weights the node starts from; a response is
a :class:`LocalUpdate`. Both travel either as JSON (``application/json``: the request is
``{"round_id": ..., "global_weights": {...}}``, the response is the update's JSON form) or as a
safetensors file (``application/x-safetensors``: tensors in their own dtype, ``F64``, ``F32``
or ``F16``, with the scalar fields as strings in the file's ``__metadata__``). Binary bodies
cost a memory copy per tensor instead of JSON's printing and parsing of every float, and a
float32 model's bodies are half a float64 model's; both formats round-trip the values exactly
(JSON's lists read back as float64, which screening casts to the model's dtype).

Decoding is bounded before anything is decoded: a safetensors header may hold at most
:data:`MAX_TENSORS` tensors in :data:`MAX_HEADER_BYTES` bytes, and when the receiver knows the
model (``expected``), the header must list exactly its tensors, with its shapes and dtypes;
:func:`max_update_bytes` is the largest body an update of a model can need.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aumai_fedtrain.inputs import describe_validation_error
from aumai_fedtrain.models import (
    CompressionConfig,
    LocalUpdate,
    TensorMap,
    as_stored,
    stored_name,
)
from aumai_fedtrain.screening import model_mismatch

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "FORMAT_KEY",
    "JSON",
    "MAX_HEADER_BYTES",
    "MAX_TENSORS",
    "MEDIA_TYPES",
    "SAFETENSORS",
    "Expected",
    "ModelMismatchError",
    "NonceAnswer",
    "TensorShape",
    "TrainRequest",
    "WireError",
    "body_media_type",
    "bounded_header",
    "count_values",
    "decode_nonce",
    "decode_request",
    "decode_update",
    "decoded_bytes",
    "encode_request",
    "encode_update",
    "expected_tensors",
    "max_update_bytes",
    "media_type",
    "request_body_bytes",
    "response_media_type",
    "safetensors_body_bytes",
    "update_body_bytes",
    "update_from_metadata",
    "update_metadata",
]

JSON = "application/json"
SAFETENSORS = "application/x-safetensors"
MEDIA_TYPES = (JSON, SAFETENSORS)
DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024
"""Largest request (node side) or response (coordinator side) body accepted by default."""
MAX_TENSORS = 65_536
"""Most tensors a safetensors body may hold when the receiver does not know the model."""
MAX_HEADER_BYTES = 16 * 1024 * 1024
"""Largest safetensors header accepted when the receiver does not know the model."""


class TensorShape(tuple[int, ...]):
    """A tensor's shape that also names the dtype its values travel in (``F64``, ``F32`` or
    ``F16``); it compares equal to the plain tuple of its dimensions."""

    dtype: str

    def __new__(cls, shape: Iterable[int], dtype: str = "F64") -> TensorShape:
        made = super().__new__(cls, shape)
        made.dtype = dtype
        return made


Expected = Mapping[str, tuple[int, ...]]
"""The model an update must match: tensor name -> shape; a :class:`TensorShape` also names
the dtype (a plain tuple: float64)."""

FORMAT_KEY = "aumai-fedtrain"
"""The safetensors metadata key that names what a body is (a request, an update, ...)."""
_REQUEST_KIND = "train-request/1"
_UPDATE_KIND = "local-update/1"
_COMPRESSION_KEY = "compression"
_RESERVED_NAME = "__metadata__"
_HEADER_LENGTH_BYTES = 8
_DEFAULT_DTYPE_NAME = "F64"
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2}
_ALIGNMENT = 8
# Bounds of an honest body beyond its values: metadata, and per tensor its header entry (name
# escaped as \uXXXX at worst, dtype, offsets, one number per dimension) or its JSON brackets.
_METADATA_SLACK_BYTES = 64 * 1024
_ENTRY_BYTES = 96
_DIMENSION_BYTES = 24
_JSON_FLOAT_BYTES = 26  # "-1.7976931348623157e+308, "
_JSON_NESTING_BYTES = 4  # "[", "]" and ", " around an element, per dimension
_ESCAPED_CHAR_BYTES = 6
_JSON_FIELD_SLACK = 64  # commas and brackets of an update's other fields (and in its strings)
ModelT = TypeVar("ModelT", bound=BaseModel)


class WireError(ValueError):
    """A body that cannot be used; ``status`` is the HTTP status a server answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ModelMismatchError(WireError):
    """An update whose tensors are not the model's (names, shapes or dtype)."""


class TrainRequest(BaseModel):
    """The body of ``POST /train``: the round to train and the global weights to start from.

    Empty ``global_weights`` ask the node to start from its initial model (the first round of
    a run whose coordinator sends no parameters, as in the user guide's Pattern 3).
    ``compression`` (absent: none) asks the node to answer its update compressed with that
    codec (:mod:`~aumai_fedtrain.network.compressed`); in a safetensors request it is the
    JSON text of the metadata's ``compression``.
    """

    model_config = ConfigDict(extra="forbid")

    round_id: Annotated[int, Field(ge=0)]
    global_weights: TensorMap = Field(default_factory=dict)
    compression: CompressionConfig | None = None


class NonceAnswer(BaseModel):
    """The answer of ``GET /nonce``: a value the node accepts in one signed request, soon."""

    nonce: Annotated[str, Field(pattern=r"^[0-9a-f]{16,128}$")]


def decode_nonce(body: bytes) -> str:
    """The nonce of a ``GET /nonce`` answer; :class:`WireError` names what is wrong."""
    return _validate(NonceAnswer, body, "nonce answer").nonce


def media_type(content_type: str | None) -> str:
    """The bare, lowercase media type of a ``Content-Type`` header (``""`` when absent)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def body_media_type(content_type: str | None) -> str:
    """:data:`JSON` or :data:`SAFETENSORS` from a ``Content-Type`` header, else 415."""
    return _check_format(media_type(content_type), status=415)


def response_media_type(accept: str | None) -> str:
    """:data:`SAFETENSORS` when the ``Accept`` header names it, else :data:`JSON`."""
    accepted = {media_type(part) for part in (accept or "").split(",")}
    return SAFETENSORS if SAFETENSORS in accepted else JSON


def encode_request(request: TrainRequest, fmt: str) -> bytes:
    """Serialise a train request as ``fmt`` (:data:`JSON` or :data:`SAFETENSORS`)."""
    if _check_format(fmt) == JSON:
        return request.model_dump_json(exclude_none=True).encode("utf-8")
    return _pack(request.global_weights, _request_metadata(request.round_id, request.compression))


def _request_metadata(
    round_id: int, compression: CompressionConfig | None = None
) -> dict[str, str]:
    metadata = {FORMAT_KEY: _REQUEST_KIND, "round_id": str(round_id)}
    if compression is not None:
        metadata[_COMPRESSION_KEY] = compression.model_dump_json()
    return metadata


def decode_request(body: bytes, content_type: str) -> TrainRequest:
    """Parse a train request; :class:`WireError` (status 400 or 415) names what is wrong."""
    if body_media_type(content_type) == JSON:
        return _validate(TrainRequest, body, "train request")
    tensors, metadata = _unpack(body, _REQUEST_KIND)
    fields: dict[str, object] = {
        "round_id": _field(metadata, "round_id"),
        "global_weights": tensors,
    }
    if _COMPRESSION_KEY in metadata:
        try:
            fields[_COMPRESSION_KEY] = json.loads(metadata[_COMPRESSION_KEY])
        except json.JSONDecodeError:
            raise WireError("invalid train request: its compression is not JSON") from None
    return _validate(TrainRequest, fields, "train request")


def encode_update(update: LocalUpdate, fmt: str) -> bytes:
    """Serialise a local update as ``fmt`` (:data:`JSON` or :data:`SAFETENSORS`)."""
    if _check_format(fmt) == JSON:
        return update.model_dump_json().encode("utf-8")
    return _pack(update.gradients, update_metadata(update))


def update_metadata(update: LocalUpdate, kind: str = _UPDATE_KIND) -> dict[str, str]:
    """The ``__metadata__`` of an update's safetensors body of ``kind``: its scalar fields as
    strings."""
    return {
        FORMAT_KEY: kind,
        "node_id": update.node_id,
        "round_id": str(update.round_id),
        "loss": repr(update.loss),
        "samples_used": str(update.samples_used),
    }


def safetensors_body_bytes(shapes: Expected, metadata: Mapping[str, str]) -> int:
    """The exact size of the safetensors body of tensors of ``shapes`` (and their dtypes, see
    :class:`TensorShape`) with ``metadata``.

    Computed without building the body: 8 bytes of header length, the JSON header (its tensors
    in the order safetensors lays them out, widest dtype first then by name, with their data
    offsets, padded with spaces to a multiple of 8 bytes), then the values' bytes.
    """
    header: dict[str, object] = {_RESERVED_NAME: dict(metadata)}
    offset = 0
    for name in sorted(shapes, key=lambda name: (-_item_bytes(shapes[name]), name)):
        end = offset + math.prod(shapes[name]) * _item_bytes(shapes[name])
        header[name] = {
            "dtype": _dtype_of(shapes[name]),
            "shape": list(shapes[name]),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return _HEADER_LENGTH_BYTES + len(text) + (-len(text)) % _ALIGNMENT + offset


def _dtype_of(shape: tuple[int, ...]) -> str:
    """The dtype name the values of a tensor of ``shape`` travel in (a plain tuple: F64)."""
    return shape.dtype if isinstance(shape, TensorShape) else _DEFAULT_DTYPE_NAME


def _item_bytes(shape: tuple[int, ...]) -> int:
    return _ITEM_BYTES[_dtype_of(shape)]


def request_body_bytes(
    round_id: int, shapes: Expected, compression: CompressionConfig | None = None
) -> int:
    """Bytes of the safetensors body of a train request for ``round_id`` with a model of
    ``shapes`` (what :func:`encode_request` makes), computed without building it."""
    return safetensors_body_bytes(shapes, _request_metadata(round_id, compression))


def update_body_bytes(update: LocalUpdate) -> int:
    """Bytes of ``update``'s safetensors body (what :func:`encode_update` makes), computed
    without building it."""
    return safetensors_body_bytes(expected_tensors(update.gradients), update_metadata(update))


def decode_update(body: bytes, content_type: str, expected: Expected | None = None) -> LocalUpdate:
    """Parse a local update; :class:`WireError` names what is wrong.

    With ``expected``, a safetensors body whose header does not list exactly the model's
    tensors, shapes and dtypes is refused before any tensor is decoded, and a JSON body with
    more numbers or lists than an update of the model (counted in one pass over its bytes)
    before it is parsed; a JSON body has no header, so the caller compares its keys and shapes
    after decoding.
    """
    if body_media_type(content_type) == JSON:
        if expected is not None:
            _check_json_counts(body, expected)
        return _validate(LocalUpdate, body, "update")
    tensors, metadata = _unpack(body, _UPDATE_KIND, expected)
    return update_from_metadata(metadata, tensors)


def update_from_metadata(metadata: Mapping[str, str], gradients: TensorMap) -> LocalUpdate:
    """The update of a safetensors body's ``metadata`` (see :func:`update_metadata`) and
    ``gradients``; :class:`WireError` names a missing or invalid field."""
    fields = {name: _field(metadata, name) for name in ("node_id", "round_id", "samples_used")}
    return _validate(
        LocalUpdate, {**fields, "loss": _field(metadata, "loss"), "gradients": gradients}, "update"
    )


def _check_format(fmt: str, status: int = 400) -> str:
    if fmt not in MEDIA_TYPES:
        raise WireError(
            f"unsupported content type {fmt or '(none)'!r}; use {JSON!r} or {SAFETENSORS!r}",
            status=status,
        )
    return fmt


def expected_tensors(weights: TensorMap) -> Expected:
    """The model ``weights`` as :data:`Expected`: name -> :class:`TensorShape` (shape and
    the dtype its values travel in, :func:`~aumai_fedtrain.models.as_stored`)."""
    return {
        name: TensorShape(value.shape, stored_name(value.dtype)) for name, value in weights.items()
    }


def max_update_bytes(expected: Expected, fmt: str) -> int:
    """The largest body an honest update of the ``expected`` model needs in format ``fmt``.

    For safetensors the values' bytes plus a bound on the header; for JSON the longest text of
    every float (``-1.7976931348623157e+308``) with its brackets and separators.
    """
    total = _METADATA_SLACK_BYTES
    for name, shape in expected.items():
        count = math.prod(shape)
        total += _ESCAPED_CHAR_BYTES * len(name) + _ENTRY_BYTES + _DIMENSION_BYTES * len(shape)
        if _check_format(fmt) == JSON:
            total += count * (_JSON_FLOAT_BYTES + _JSON_NESTING_BYTES * len(shape))
        else:
            total += count * _item_bytes(shape)
    return total


def count_values(expected: Expected) -> tuple[int, int]:
    """How many numbers and how many JSON lists an update of the ``expected`` model holds."""
    values = lists = 0
    for shape in expected.values():
        values += math.prod(shape)
        lists += sum(math.prod(shape[:depth]) for depth in range(len(shape)))
    return values, lists


def decoded_bytes(expected: Expected) -> int:
    """Bytes the arrays of an update of the ``expected`` model take once decoded (its dtypes)."""
    return sum(math.prod(shape) * _item_bytes(shape) for shape in expected.values())


def _check_json_counts(body: bytes, expected: Expected) -> None:
    """Refuse a JSON update with more lists or numbers than the model's, before parsing it."""
    values, lists = count_values(expected)
    names = sum(len(name) for name in expected) + _JSON_FIELD_SLACK
    found_lists, found_commas = body.count(b"["), body.count(b",")
    if found_lists > lists + names or found_commas > values + lists + 2 * names:
        raise WireError(
            f"JSON update has {found_lists} lists and {found_commas} commas; an update of the "
            f"model has {lists} lists of {values} numbers"
        )


def _pack(tensors: TensorMap, metadata: dict[str, str]) -> bytes:
    from safetensors.numpy import save

    if _RESERVED_NAME in tensors:
        raise WireError(f"tensor name {_RESERVED_NAME!r} is reserved by safetensors")
    arrays = {name: as_stored(value) for name, value in tensors.items()}
    return save(arrays, metadata=metadata)


def _unpack(
    body: bytes, kind: str, expected: Expected | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors.numpy import load

    metadata = _check_header(_read_header(body, expected), expected)
    if metadata.get(FORMAT_KEY) != kind:
        raise WireError(
            f"safetensors body is not a {kind} (metadata {FORMAT_KEY!r} is "
            f"{metadata.get(FORMAT_KEY)!r})"
        )
    try:
        tensors = load(body)
    except KeyError as exc:  # a dtype numpy has no counterpart for (e.g. BF16)
        raise WireError(f"unsupported safetensors dtype {exc}") from None
    except Exception as exc:  # SafetensorError, a shape NumPy cannot build, any other failure
        raise WireError(f"malformed safetensors body ({exc})") from None
    return tensors, metadata


def _read_header(body: bytes, expected: Expected | None) -> dict[str, Any]:
    """The JSON header of a safetensors body, refused when longer than the receiver allows."""
    limit = MAX_HEADER_BYTES
    if expected is not None:
        limit = min(limit, max_update_bytes(expected, SAFETENSORS) - _values_bytes(expected))
    return bounded_header(body, limit)


def bounded_header(body: bytes, limit: int) -> dict[str, Any]:
    """The JSON header of a safetensors body (a dict, ``__metadata__`` included), read without
    decoding any tensor; :class:`WireError` when malformed or longer than ``limit`` bytes."""
    length = int.from_bytes(body[:_HEADER_LENGTH_BYTES], "little")
    if len(body) < _HEADER_LENGTH_BYTES or length > len(body) - _HEADER_LENGTH_BYTES:
        raise WireError("malformed safetensors body (its header length exceeds the body)")
    if length > limit:
        raise WireError(f"safetensors header of {length} bytes exceeds the limit of {limit} bytes")
    try:
        header = json.loads(body[_HEADER_LENGTH_BYTES : _HEADER_LENGTH_BYTES + length])
    except Exception as exc:  # any failure of the parser on untrusted bytes, e.g. a
        # RecursionError on deeply nested arrays, is a malformed body
        raise WireError(f"malformed safetensors body (header: {_failure(exc)})") from None
    if not isinstance(header, dict):
        raise WireError("malformed safetensors body (the header is not a JSON object)")
    return header


def _values_bytes(expected: Expected) -> int:
    return sum(math.prod(shape) * _item_bytes(shape) for shape in expected.values())


def _check_header(header: dict[str, Any], expected: Expected | None) -> dict[str, str]:
    """The header's ``__metadata__``, once its tensors are allowed (see :func:`decode_update`)."""
    metadata = header.pop(_RESERVED_NAME, None)
    limit = MAX_TENSORS if expected is None else len(expected)
    if len(header) > limit:
        raise WireError(f"safetensors body holds {len(header)} tensors, more than {limit}")
    if expected is not None:
        shapes: dict[str, tuple[int, ...]] = {}
        for name, entry in header.items():
            shape = entry.get("shape") if isinstance(entry, dict) else None
            if not isinstance(shape, list) or not all(isinstance(n, int) for n in shape):
                raise WireError(f"malformed safetensors body (tensor {name!r}: no valid shape)")
            wanted = _dtype_of(expected[name]) if name in expected else entry.get("dtype")
            if entry.get("dtype") != wanted:
                raise ModelMismatchError(
                    f"tensor {name!r} has dtype {entry.get('dtype')!r}; this model's updates "
                    f"carry {wanted} values"
                )
            shapes[name] = tuple(shape)
        problem = model_mismatch(shapes, expected)
        if problem is not None:
            raise ModelMismatchError(problem)
    return metadata if isinstance(metadata, dict) else {}


def _field(metadata: Mapping[str, str], name: str) -> str:
    if name not in metadata:
        raise WireError(f"safetensors metadata lacks {name!r}")
    return metadata[name]


def _validate(model: type[ModelT], data: bytes | dict[str, object], what: str) -> ModelT:
    """``model`` from a JSON body or from fields; :class:`WireError` naming what is wrong."""
    try:
        if isinstance(data, bytes):
            return model.model_validate_json(data)
        return model.model_validate(data)
    except ValidationError as exc:
        raise WireError(f"invalid {what}: {describe_validation_error(exc)}") from None
    except Exception as exc:  # any other failure on untrusted input is a malformed body
        raise WireError(f"invalid {what}: {_failure(exc)}") from None


def _failure(exc: Exception) -> str:
    """A parser's exception in one line (its type when the message does not say much)."""
    message = str(exc).splitlines()[0] if str(exc) else ""
    return message if isinstance(exc, ValueError) else f"{type(exc).__name__}: {message}"
