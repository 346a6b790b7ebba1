"""Bodies of ``POST /train``: JSON (the user guide's form) or safetensors, chosen by media type.

A request carries the round id and the global model weights the node starts from; a response is
a :class:`LocalUpdate`. Both travel either as JSON (``application/json``: the request is
``{"round_id": ..., "global_weights": {...}}``, the response is the update's JSON form) or as a
safetensors file (``application/x-safetensors``: float64 tensors, with the scalar fields as
strings in the file's ``__metadata__``). Binary bodies cost a memory copy per tensor instead of
JSON's printing and parsing of every float; both round-trip float64 values exactly.
"""

from __future__ import annotations

import json
from typing import Annotated, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aumai_fedtrain.inputs import describe_validation_error
from aumai_fedtrain.models import LocalUpdate, TensorMap

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "JSON",
    "MEDIA_TYPES",
    "SAFETENSORS",
    "TrainRequest",
    "WireError",
    "body_media_type",
    "decode_request",
    "decode_update",
    "encode_request",
    "encode_update",
    "media_type",
    "response_media_type",
]

JSON = "application/json"
SAFETENSORS = "application/x-safetensors"
MEDIA_TYPES = (JSON, SAFETENSORS)
DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024
"""Largest request (node side) or response (coordinator side) body accepted by default."""

_FORMAT_KEY = "aumai-fedtrain"
_REQUEST_KIND = "train-request/1"
_UPDATE_KIND = "local-update/1"
_RESERVED_NAME = "__metadata__"
_HEADER_LENGTH_BYTES = 8
ModelT = TypeVar("ModelT", bound=BaseModel)


class WireError(ValueError):
    """A body that cannot be used; ``status`` is the HTTP status a server answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class TrainRequest(BaseModel):
    """The body of ``POST /train``: the round to train and the global weights to start from.

    Empty ``global_weights`` ask the node to start from its initial model (the first round of
    a run whose coordinator sends no parameters, as in the user guide's Pattern 3).
    """

    model_config = ConfigDict(extra="forbid")

    round_id: Annotated[int, Field(ge=0)]
    global_weights: TensorMap = Field(default_factory=dict)


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
        return request.model_dump_json().encode("utf-8")
    metadata = {_FORMAT_KEY: _REQUEST_KIND, "round_id": str(request.round_id)}
    return _pack(request.global_weights, metadata)


def decode_request(body: bytes, content_type: str) -> TrainRequest:
    """Parse a train request; :class:`WireError` (status 400 or 415) names what is wrong."""
    if body_media_type(content_type) == JSON:
        return _validate(TrainRequest, body, "train request")
    tensors, metadata = _unpack(body, _REQUEST_KIND)
    return _validate(
        TrainRequest,
        {"round_id": _field(metadata, "round_id"), "global_weights": tensors},
        "train request",
    )


def encode_update(update: LocalUpdate, fmt: str) -> bytes:
    """Serialise a local update as ``fmt`` (:data:`JSON` or :data:`SAFETENSORS`)."""
    if _check_format(fmt) == JSON:
        return update.model_dump_json().encode("utf-8")
    metadata = {
        _FORMAT_KEY: _UPDATE_KIND,
        "node_id": update.node_id,
        "round_id": str(update.round_id),
        "loss": repr(update.loss),
        "samples_used": str(update.samples_used),
    }
    return _pack(update.gradients, metadata)


def decode_update(body: bytes, content_type: str) -> LocalUpdate:
    """Parse a local update; :class:`WireError` names what is wrong."""
    if body_media_type(content_type) == JSON:
        return _validate(LocalUpdate, body, "update")
    tensors, metadata = _unpack(body, _UPDATE_KIND)
    fields = {name: _field(metadata, name) for name in ("node_id", "round_id", "samples_used")}
    return _validate(
        LocalUpdate, {**fields, "loss": _field(metadata, "loss"), "gradients": tensors}, "update"
    )


def _check_format(fmt: str, status: int = 400) -> str:
    if fmt not in MEDIA_TYPES:
        raise WireError(
            f"unsupported content type {fmt or '(none)'!r}; use {JSON!r} or {SAFETENSORS!r}",
            status=status,
        )
    return fmt


def _pack(tensors: TensorMap, metadata: dict[str, str]) -> bytes:
    from safetensors.numpy import save

    if _RESERVED_NAME in tensors:
        raise WireError(f"tensor name {_RESERVED_NAME!r} is reserved by safetensors")
    arrays = {name: np.asarray(value, dtype="<f8", order="C") for name, value in tensors.items()}
    return save(arrays, metadata=metadata)


def _unpack(body: bytes, kind: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        tensors = load(body)
    except (SafetensorError, ValueError) as exc:  # ValueError: a shape NumPy cannot build
        raise WireError(f"malformed safetensors body ({exc})") from None
    except KeyError as exc:  # a dtype numpy has no counterpart for (e.g. BF16)
        raise WireError(f"unsupported safetensors dtype {exc}") from None
    metadata = _safetensors_metadata(body)
    if metadata.get(_FORMAT_KEY) != kind:
        raise WireError(
            f"safetensors body is not a {kind} (metadata {_FORMAT_KEY!r} is "
            f"{metadata.get(_FORMAT_KEY)!r})"
        )
    return tensors, metadata


def _safetensors_metadata(body: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file that :func:`load` has already accepted."""
    length = int.from_bytes(body[:_HEADER_LENGTH_BYTES], "little")
    header = json.loads(body[_HEADER_LENGTH_BYTES : _HEADER_LENGTH_BYTES + length])
    metadata = header.get(_RESERVED_NAME)
    return metadata if isinstance(metadata, dict) else {}


def _field(metadata: dict[str, str], name: str) -> str:
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
