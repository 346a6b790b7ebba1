"""Compressed pseudo-gradients: the codecs a node encodes its update with, in NumPy.

A node compresses what it sends upstream; the global parameters sent to the nodes stay
uncompressed (they are the model every node must start from exactly, and a node receives them
once per round where it sends one update: compressing them is left to the transport).

Codecs (:data:`CODECS`):

- ``none``: the values as they are (the model's dtype);
- ``fp16``: IEEE half precision, round to nearest even;
- ``bf16``: bfloat16 (the top 16 bits of the float32, rounded to nearest even), sent as its
  bits;
- ``int8``: blocks of ``block_size`` values, each with a float32 scale ``absmax / 127`` and
  codes ``round(x / scale)`` in [-127, 127];
- ``int4``: the same with 4-bit codes in [-7, 7] (scale ``absmax / 7``), two per byte;
- ``e3m0``: Streaming DiLoCo's 4-bit float (a sign and a 3-bit exponent, no mantissa): per
  block a float32 scale ``absmax``, and each value the nearest of ``0`` and
  ``±scale * 2^-k`` for ``k`` in 0..6, two per byte.

A value decodes to ``code * scale`` computed exactly in float64 (both factors have few
significant bits), then rounded once to the model's dtype. Blocks never span two tensors;
the last block of a tensor may be short.

**Error feedback** (:class:`ErrorFeedback`): the node adds the residual of its previous
encoding (what the codec lost) to its next pseudo-gradient before encoding it, so that
quantisation errors are sent later instead of lost. The residual is node state, kept in
checkpoints (:class:`CompressingTrainer` puts it in the trainer's ``state_dict``).

**On the wire** (:func:`encode_body`): one safetensors body per update, with two tensors
whatever the model's size: ``codes`` (every tensor's codes, in the model's sorted key order,
each tensor starting on a byte) and ``scales`` (every block's float32 scale, in the same
order), and the codec in the metadata; the receiver knows the model's shapes and dtypes, so
the header names no per-tensor layout. :func:`decode_body` reads it back.

**At the coordinator** (:func:`average_encoded`): the weighted mean of encoded updates is
computed without decoding them first: the backend's kernel reads each update's codes and
scales once, decodes them in registers and adds them into the float64 average, with the
bits of decoding each update (:func:`decode`) and averaging the decoded arrays
(``weighted_average``). A streamed mean takes them one fold at a time the same way
(``WeightedSum.fold_encoded``): an :class:`EncodedUpdate` (what a compressed HTTP answer
becomes) is screened from its codes and scales (:func:`max_abs_encoded`) and folded without a
decoded copy; whatever needs its values takes :meth:`EncodedUpdate.decoded`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np
from pydantic import ConfigDict
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from aumai_fedtrain._fallback import EMPTY_UPDATES_MESSAGE, _check_weights
from aumai_fedtrain.backend import get_backend
from aumai_fedtrain.models import (
    CompressionCodec,
    CompressionConfig,
    LocalUpdate,
    TensorMap,
    TrainingConfig,
    check_block_size,
)
from aumai_fedtrain.trainer import NodeTrainer, TrainerFactory, TrainResult

__all__ = [
    "CODECS",
    "Codec",
    "CodecName",
    "CompressingTrainer",
    "Encoded",
    "EncodedUpdate",
    "ErrorFeedback",
    "average_encoded",
    "code_bytes",
    "compressing",
    "decode",
    "decode_body",
    "decode_bytes",
    "decode_map",
    "encode",
    "encode_body",
    "max_abs_encoded",
]

CodecName = CompressionCodec
CODECS: tuple[CodecName, ...] = get_args(CompressionCodec)

_BLOCKWISE = {"int8": 127, "int4": 7, "e3m0": 1}
"""Blockwise codecs and the largest code magnitude (the scale is ``absmax / that``)."""

_E3M0_STEPS = 7
"""Non-zero magnitudes of an e3m0 code: ``2^-k`` for ``k`` in 0..6, codes 1..7 (0 is zero)."""


@dataclass(frozen=True)
class Codec:
    """A compression codec (see the module) and its block size.

    Parameters
    ----------
    name
        One of :data:`CODECS`.
    block_size
        Values per scale of the blockwise codecs (``int8``, ``int4``, ``e3m0``): a power of
        two from 8 to 65,536. Ignored by the others.
    """

    name: CodecName = "none"
    block_size: int = 128

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"unknown codec {self.name!r}: expected one of {', '.join(CODECS)}")
        try:
            check_block_size(self.block_size)
        except ValueError as exc:
            raise ValueError(f"block_size {exc}") from None

    @classmethod
    def of(cls, config: CompressionConfig) -> Codec:
        """The codec a run's ``TrainingConfig.compression`` chooses."""
        return cls(config.codec, config.block_size)

    @property
    def blockwise(self) -> bool:
        """Whether values go in blocks with a scale each."""
        return self.name in _BLOCKWISE


@dataclass(frozen=True)
class Encoded:
    """One tensor encoded by a codec: its codes, its block scales, its shape and dtype."""

    codec: Codec
    codes: np.ndarray
    scales: np.ndarray | None
    shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def nbytes(self) -> int:
        """Bytes of the codes and scales."""
        return self.codes.nbytes + (0 if self.scales is None else self.scales.nbytes)


class EncodedUpdate(LocalUpdate):
    """A node's update whose pseudo-gradient is still encoded: ``gradients`` is empty and
    ``encoded`` holds each tensor's codes and scales (in the model's dtypes and shapes).

    The streamed mean screens it from its codes and scales and folds it with the backend's
    ``WeightedSum.fold_encoded``, bit for bit as its decoded values; whatever needs the
    values (robust rules, a round's list of updates) takes :meth:`decoded`.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    encoded: dict[str, Encoded]

    @property
    def nbytes(self) -> int:
        """Bytes of the codes and scales."""
        return sum(tensor.nbytes for tensor in self.encoded.values())

    def decoded(self) -> LocalUpdate:
        """The update with its values decoded (:func:`decode`) into ``gradients``."""
        gradients = decode_map(self.encoded, f"node {self.node_id}")
        return self.without_tensors().model_copy(update={"gradients": gradients})

    def without_tensors(self) -> LocalUpdate:
        """A plain :class:`LocalUpdate` of the same node, round, loss and samples, without
        gradients or encodings."""
        return LocalUpdate(
            node_id=self.node_id,
            round_id=self.round_id,
            gradients={},
            loss=self.loss,
            samples_used=self.samples_used,
        )


def max_abs_encoded(encoded: Mapping[str, Encoded]) -> list[float]:
    """Per tensor, in the map's order, the largest ``|x|`` of the values it decodes to (the
    backend's ``max_abs`` of :func:`decode`'s arrays: NaN when one is NaN, ``0.0`` for an
    empty tensor), computed from the codes and scales without decoding them.

    A blockwise tensor's is the largest of each block's ``|scale| * max |level|`` (exact in
    float64), rounded to the tensor's dtype as decoding rounds each value (rounding is
    monotonic); a 16-bit float's the largest magnitude of its bits, in the tensor's dtype.
    """
    return [_max_abs_of(tensor) for tensor in encoded.values()]


_NIBBLE_MAGNITUDE = np.array(
    [max(abs((byte & 0x0F) - 8), abs((byte >> 4) - 8)) for byte in range(256)], dtype=np.uint8
)
"""The larger magnitude of the two signed 4-bit codes of each byte (``nibble - 8``)."""


def _zero_times_infinity(encoded: Encoded) -> bool:
    """Whether a block of infinite scale holds a code 0 (which decodes to NaN)."""
    assert encoded.scales is not None
    block, count = encoded.codec.block_size, math.prod(encoded.shape)
    for index in np.flatnonzero(np.isinf(encoded.scales)):
        start, stop = int(index) * block, min((int(index) + 1) * block, count)
        if encoded.codec.name == "int8":
            codes = encoded.codes[start:stop]
        else:  # (blocks start on a byte: a block holds an even number of values)
            codes = _unpack_nibbles(encoded.codes[start // 2 : (stop + 1) // 2], stop - start)
        if not codes.all():
            return True
    return False


def _max_abs_of(encoded: Encoded) -> float:
    codec, count, dtype = encoded.codec, math.prod(encoded.shape), np.dtype(encoded.dtype)
    if count == 0:
        return 0.0
    if codec.name == "none":
        largest = np.max(np.abs(encoded.codes))  # NaN propagates
        return float(largest)
    if codec.name in ("fp16", "bf16"):
        # A float's magnitude orders as its bits without the sign; NaNs are the largest.
        top = int((_bytes_of(encoded.codes).view(np.uint16) & 0x7FFF).max())
        if codec.name == "fp16":
            return math.nan if top > 0x7C00 else float(np.uint16(top).view(np.float16))
        if top > 0x7F80:
            return math.nan
        with np.errstate(over="ignore"):
            return float(np.uint32(top << 16).view(np.float32).astype(dtype))
    assert encoded.scales is not None
    if np.isinf(encoded.scales).any() and _zero_times_infinity(encoded):
        return math.nan
    if codec.name == "int8":
        starts = np.arange(0, count, codec.block_size)
        codes = encoded.codes.view(np.int8)
        highest = np.maximum.reduceat(codes, starts).astype(np.int16)
        lowest = np.minimum.reduceat(codes, starts).astype(np.int16)
        levels = np.maximum(np.abs(highest), np.abs(lowest)).astype(np.float64)
    else:
        magnitudes = _NIBBLE_MAGNITUDE[encoded.codes]
        if count % 2:  # the last byte's high nibble is padding, not a value
            magnitudes[-1] = abs(int(encoded.codes[-1] & 0x0F) - 8)
        largest = np.maximum.reduceat(magnitudes, np.arange(0, count, codec.block_size) // 2)
        levels = (
            _e3m0_levels(largest.astype(np.int8))
            if codec.name == "e3m0"
            else largest.astype(np.float64)
        )
    with np.errstate(invalid="ignore", over="ignore"):
        products = levels * np.abs(encoded.scales.astype(np.float64))
        return float(np.float64(products.max()).astype(dtype))


def encode(values: np.ndarray, codec: Codec) -> Encoded:
    """``values`` (a float array) encoded by ``codec``.

    Raises ``ValueError`` for values that are not finite floats (screen before encoding).
    """
    values = np.asarray(values)
    if values.dtype.kind != "f":
        raise ValueError(f"cannot encode values of dtype {values.dtype}: expected floats")
    if not np.isfinite(values).all():
        raise ValueError("cannot encode non-finite values")
    flat = values.reshape(-1)
    if codec.name == "none":
        return Encoded(codec, flat.copy(), None, values.shape, values.dtype)
    if codec.name in ("fp16", "bf16"):
        with np.errstate(over="ignore"):
            codes = flat.astype(np.float16) if codec.name == "fp16" else _to_bf16_bits(flat)
        encoded = Encoded(codec, codes, None, values.shape, values.dtype)
        if not np.isfinite(decode(encoded)).all():
            largest = {"fp16": "65504", "bf16": "3.39e38"}[codec.name]
            raise ValueError(
                f"values beyond {codec.name}'s range (about {largest}) cannot be encoded with "
                "it: use a blockwise codec (int8, int4, e3m0), whose scales follow the values"
            )
        return encoded
    wide = flat.astype(np.float64)
    scales = _block_scales(wide, codec)
    per_value = np.repeat(scales.astype(np.float64), codec.block_size)[: wide.size]
    safe = np.where(per_value > 0, per_value, 1.0)
    if codec.name == "e3m0":
        codes = _e3m0_codes(wide / safe)
    else:
        limit = _BLOCKWISE[codec.name]
        codes = np.clip(np.rint(wide / safe), -limit, limit).astype(np.int8)
    if codec.name != "int8":
        codes = _pack_nibbles(codes)
    return Encoded(codec, codes, scales, values.shape, values.dtype)


def decode(encoded: Encoded) -> np.ndarray:
    """The values ``encoded`` stands for, in its dtype (see the module for the rounding)."""
    codec, count = encoded.codec, math.prod(encoded.shape)
    if codec.name in ("none", "fp16"):
        wide = encoded.codes
    elif codec.name == "bf16":
        wide = (encoded.codes.astype(np.uint32) << 16).view(np.float32)
    else:
        assert encoded.scales is not None
        codes = encoded.codes if codec.name == "int8" else _unpack_nibbles(encoded.codes, count)
        levels = _e3m0_levels(codes) if codec.name == "e3m0" else codes.astype(np.float64)
        per_value = np.repeat(encoded.scales.astype(np.float64), codec.block_size)[:count]
        wide = levels * per_value
    return wide.astype(encoded.dtype).reshape(encoded.shape)


def decode_bytes(
    codec: str,
    block_size: int,
    dtype: str,
    count: int,
    codes: np.ndarray,
    scales: np.ndarray | None,
) -> np.ndarray:
    """:func:`decode` of ``count`` values given as their code bytes (a uint8 array) and
    block scales, to a flat array of ``dtype``."""
    chosen, model_dtype = Codec(codec, block_size), np.dtype(dtype)  # type: ignore[arg-type]
    typed = _codes_from_bytes(codes, chosen, model_dtype)
    return decode(Encoded(chosen, typed, scales, (count,), model_dtype))


def average_encoded(
    updates: Sequence[Mapping[str, Encoded]],
    weights: Sequence[float],
    labels: Sequence[str] | None = None,
    backend: str | None = None,
) -> TensorMap:
    """Per-key weighted mean of encoded updates, dequantised inside the average.

    The result is, bit for bit, ``weighted_average`` of the decoded updates
    (``[{key: decode(e) for key, e in u.items()} for u in updates]``): per key, over the
    updates that carry a non-empty value for it, ``sum(w_i * x_i) / sum(w_i)`` accumulated in
    float64 in update order and rounded once to the model's float type. The native backend
    gets it in one pass over the compressed bytes, never making a decoded copy of an update.

    Parameters
    ----------
    updates
        One map of key to :class:`Encoded` per node. The encodings of one key must agree in
        codec (and block size for a blockwise codec), shape and float dtype.
    weights
        One finite, non-negative real number per update, as ``weighted_average`` takes them.
    labels
        Names of the updates for error messages; ``"update #i"`` by default.
    backend
        ``"native"``, ``"python"``, or None for the default (:func:`backend.get_backend`).

    Returns
    -------
    TensorMap
        Key (in order of first appearance) to the average in the encodings' shape and dtype;
        an empty float64 array for a key that no update carries non-empty.

    Raises
    ------
    ValueError
        Empty ``updates``, weights as ``weighted_average`` refuses them, encodings of one key
        that differ in codec, block size, shape or dtype (naming the key and both updates),
        codes or scales that do not hold the encoding's values, or all-zero weights for a key.
    TypeError
        A weight that is not a real number, an update that is not a mapping, or a value that
        is not an :class:`Encoded`.
    """
    if len(updates) == 0:
        raise ValueError(EMPTY_UPDATES_MESSAGE)
    checked, _ = _check_weights(weights, len(updates))
    names = list(labels) if labels is not None else [f"update #{i}" for i in range(len(updates))]
    if len(names) != len(updates):
        raise ValueError(f"got {len(names)} labels for {len(updates)} updates")
    carriers: dict[str, list[tuple[str, float, Encoded]]] = {}
    for update, weight, label in zip(updates, checked, names, strict=True):
        for key, encoded in _checked_tensors(update, label):
            entries = carriers.setdefault(key, [])
            if math.prod(encoded.shape):
                entries.append((label, weight, encoded))
    for key, entries in carriers.items():
        for label, _, encoded in entries[1:]:
            _check_agrees(key, (label, encoded), entries[0][0::2])
    chosen = get_backend(backend)
    result: TensorMap = {}
    for key, entries in carriers.items():
        if not entries:
            result[key] = np.empty(0, dtype=np.float64)
            continue
        key_weights = [weight for _, weight, _ in entries]
        if math.fsum(key_weights) == 0:
            raise ValueError(f"gradient {key!r}: all weights of the updates that carry it are zero")
        first = entries[0][2]
        if first.codec.name == "none":
            values = [{key: encoded.codes.reshape(first.shape)} for _, _, encoded in entries]
            result[key] = chosen.weighted_average(values, key_weights)[key]
            continue
        flat = chosen.dequantise_average(
            first.codec.name,
            first.codec.block_size,
            first.dtype.name,
            math.prod(first.shape),
            [_bytes_of(encoded.codes) for _, _, encoded in entries],
            [encoded.scales for _, _, encoded in entries],
            key_weights,
        )
        result[key] = flat.reshape(first.shape)
    return result


def decode_map(update: Mapping[str, Encoded], label: str = "the update") -> TensorMap:
    """Every tensor of ``update`` decoded (:func:`decode`; NaN and inf as they are), after
    checking that each is an :class:`Encoded` whose codes and scales hold its values
    (``ValueError`` / ``TypeError`` naming the key and ``label``)."""
    tensors = list(_checked_tensors(update, label))
    with np.errstate(over="ignore", invalid="ignore"):
        return {key: decode(encoded) for key, encoded in tensors}


def _checked_tensors(update: object, label: str) -> list[tuple[str, Encoded]]:
    """The ``(key, encoding)`` pairs of ``update``, checked to be a mapping of
    :class:`Encoded` whose non-empty codes and scales hold their values."""
    if not isinstance(update, Mapping):
        raise TypeError(f"{label}: an update must be a mapping, got {type(update).__name__}")
    pairs: list[tuple[str, Encoded]] = []
    for key, encoded in update.items():
        if not isinstance(encoded, Encoded):
            raise TypeError(
                f"{label}: gradient {key!r} is {type(encoded).__name__}, expected Encoded"
            )
        if math.prod(encoded.shape):
            _check_encoded(key, label, encoded)
        pairs.append((key, encoded))
    return pairs


_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _check_encoded(key: str, label: str, encoded: Encoded) -> None:
    """A ``ValueError`` unless ``encoded``'s codes and scales hold its values."""
    site = f"gradient {key!r} from {label}"
    codec, dtype, count = encoded.codec, np.dtype(encoded.dtype), math.prod(encoded.shape)
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{site}: dtype {dtype} is not float16, float32 or float64")
    code_dtype = _codes_from_bytes(np.empty(0, np.uint8), codec, dtype).dtype
    codes = encoded.codes
    if (
        not isinstance(codes, np.ndarray)
        or codes.dtype != code_dtype
        or codes.size * (code_dtype.itemsize) != code_bytes(codec, count, dtype)
    ):
        raise ValueError(
            f"{site}: {codec.name} codes of {count} values are "
            f"{code_bytes(codec, count, dtype) // code_dtype.itemsize} {code_dtype} values"
        )
    if codec.blockwise:
        blocks = math.ceil(count / codec.block_size)
        scales = encoded.scales
        if (
            not isinstance(scales, np.ndarray)
            or scales.dtype != np.float32
            or scales.shape != (blocks,)
        ):
            raise ValueError(f"{site}: {codec.name} scales are {blocks} float32 values")


def _check_agrees(key: str, entry: tuple[str, Encoded], first: tuple[str, Encoded]) -> None:
    """A ``ValueError`` unless ``entry``'s encoding agrees with the key's ``first``."""
    (label, encoded), (first_label, reference) = entry, first
    codec, first_codec = encoded.codec, reference.codec
    for what, mine, theirs in (
        ("shape", encoded.shape, reference.shape),
        ("codec", codec.name, first_codec.name),
        (
            "block size",
            codec.block_size if codec.blockwise else None,
            first_codec.block_size if first_codec.blockwise else None,
        ),
        ("dtype", np.dtype(encoded.dtype), np.dtype(reference.dtype)),
    ):
        if mine != theirs:
            raise ValueError(
                f"gradient {key!r}: {what} {mine} from {label} does not match "
                f"{what} {theirs} from {first_label}"
            )


def _block_scales(values: np.ndarray, codec: Codec) -> np.ndarray:
    """Each block's float32 scale, ``absmax / largest code`` (codes are clipped to the
    largest, so a scale rounded down to float32 costs nothing)."""
    blocks = math.ceil(values.size / codec.block_size)
    padded = np.zeros(blocks * codec.block_size)
    padded[: values.size] = np.abs(values)
    absmax = padded.reshape(blocks, codec.block_size).max(axis=1)
    scales: np.ndarray = (absmax / _BLOCKWISE[codec.name]).astype(np.float32)
    return scales


def _e3m0_codes(scaled: np.ndarray) -> np.ndarray:
    """Signed e3m0 codes (-7..7) of values in [-1, 1]: the nearest of 0 and ±2^-k, k in 0..6
    (ties to the larger magnitude)."""
    magnitude = np.abs(scaled)
    fraction, exponent = np.frexp(magnitude)  # magnitude = fraction * 2^exponent, [0.5, 1)
    power = np.where(fraction >= 0.75, exponent, exponent - 1)  # the nearest power of two
    codes = np.clip(power + _E3M0_STEPS, 1, _E3M0_STEPS)
    codes = np.where(magnitude >= 2.0**-_E3M0_STEPS, codes, 0)  # nearer 0 than 2^-6
    signed: np.ndarray = (np.sign(scaled) * codes).astype(np.int8)
    return signed


def _e3m0_levels(codes: np.ndarray) -> np.ndarray:
    """The value in [-1, 1] of each signed e3m0 code."""
    magnitude = np.abs(codes).astype(np.int64)
    levels = np.where(magnitude > 0, np.ldexp(1.0, magnitude - _E3M0_STEPS), 0.0)
    values: np.ndarray = np.sign(codes) * levels
    return values


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Signed codes in -7..7, two per byte (``code + 8``, the first in the low nibble)."""
    nibbles = (codes.astype(np.int16) + 8).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(8))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    """The signed codes of :func:`_pack_nibbles`."""
    nibbles = np.empty(packed.size * 2, dtype=np.int8)
    nibbles[0::2] = packed & 0x0F
    nibbles[1::2] = packed >> 4
    return nibbles[:count] - 8


def _to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 bits of ``values`` (via float32), rounded to nearest even."""
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


class ErrorFeedback:
    """Encodes a node's pseudo-gradients, carrying what the codec lost into the next round.

    ``encode(g)`` encodes ``g + residual`` and keeps ``(g + residual) - decode(...)`` as the
    new residual, per tensor, in the tensor's dtype. ``enabled=False`` encodes ``g`` alone.
    """

    def __init__(self, codec: Codec, enabled: bool = True) -> None:
        self.codec = codec
        self.enabled = enabled
        self.residual: TensorMap = {}

    def encode(self, gradients: Mapping[str, np.ndarray]) -> dict[str, Encoded]:
        """Every tensor of ``gradients`` encoded (with the residual added when enabled)."""
        return self.encode_and_decode(gradients)[0]

    def encode_and_decode(
        self, gradients: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, Encoded], TensorMap]:
        """:meth:`encode`, and the values each encoding decodes to (decoded once)."""
        encoded: dict[str, Encoded] = {}
        decoded: TensorMap = {}
        for key, value in gradients.items():
            value = np.asarray(value)
            residual = self.residual.get(key)
            compensated = value + residual if self.enabled and residual is not None else value
            encoded[key] = encode(compensated, self.codec)
            decoded[key] = decode(encoded[key])
            if self.enabled:
                self.residual[key] = compensated - decoded[key]
        return encoded, decoded


def encode_body(encoded: Mapping[str, Encoded], metadata: Mapping[str, str]) -> bytes:
    """The safetensors body of an update's ``encoded`` tensors (see the module).

    ``metadata`` (node, round, loss, ...) goes into the header with the codec's name and
    block size.
    """
    if not encoded:
        raise ValueError("cannot encode an update without tensors")
    codec = next(iter(encoded.values())).codec
    keys = sorted(encoded)
    tensors = {"codes": np.concatenate([_bytes_of(encoded[key].codes) for key in keys])}
    if codec.blockwise:
        tensors["scales"] = np.concatenate([_scales_of(encoded[key]) for key in keys])
    header = {**metadata, "codec": codec.name, "block_size": str(codec.block_size)}
    return save_safetensors(tensors, metadata=header)


def decode_body(body: bytes, model: Mapping[str, np.ndarray]) -> dict[str, Encoded]:
    """The tensors of a body made by :func:`encode_body` for a model like ``model`` (its
    keys, shapes and dtypes); ``ValueError`` names a body that does not fit it."""
    header = _metadata_of(body)
    tensors = load_safetensors(body)
    codec = Codec(header.get("codec", "none"), int(header.get("block_size", "128")))  # type: ignore[arg-type]
    codes, scales = tensors.get("codes"), tensors.get("scales")
    if codes is None or (codec.blockwise and scales is None):
        raise ValueError("a compressed body needs its codes (and scales for a blockwise codec)")
    raw = codes.view(np.uint8)
    decoded: dict[str, Encoded] = {}
    byte_at = scale_at = 0
    for key in sorted(model):
        dtype, shape = np.asarray(model[key]).dtype, np.asarray(model[key]).shape
        count = math.prod(shape)
        width = code_bytes(codec, count, dtype)
        if byte_at + width > raw.size:
            raise ValueError(f"the compressed body is too short for tensor {key!r}")
        piece = raw[byte_at : byte_at + width]
        byte_at += width
        block_scales = None
        if codec.blockwise:
            assert scales is not None
            blocks = math.ceil(count / codec.block_size)
            block_scales = scales[scale_at : scale_at + blocks]
            scale_at += blocks
        codes_of_key = _codes_from_bytes(piece, codec, dtype)
        decoded[key] = Encoded(codec, codes_of_key, block_scales, shape, dtype)
    if byte_at != raw.size or (scales is not None and scale_at != scales.size):
        raise ValueError("the compressed body holds more values than the model")
    return decoded


def _metadata_of(body: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors body's header."""
    if len(body) < 8:
        raise ValueError("a compressed body is a safetensors body: it is too short")
    length = int.from_bytes(body[:8], "little")
    try:
        header = json.loads(body[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("the compressed body's header is not JSON") from None
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def _bytes_of(codes: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(codes).reshape(-1).view(np.uint8)


def code_bytes(codec: Codec, count: int, dtype: np.dtype[Any]) -> int:
    """Bytes of one tensor's codes of ``count`` values."""
    if codec.name == "none":
        return count * dtype.itemsize
    if codec.name in ("fp16", "bf16"):
        return 2 * count
    return count if codec.name == "int8" else (count + 1) // 2


def _scales_of(encoded: Encoded) -> np.ndarray:
    if encoded.scales is None:
        raise ValueError("every tensor of a blockwise codec has scales")
    return encoded.scales


def _codes_from_bytes(piece: np.ndarray, codec: Codec, dtype: np.dtype[Any]) -> np.ndarray:
    code_dtypes: dict[str, np.dtype[Any]] = {
        "none": dtype,
        "fp16": np.dtype(np.float16),
        "bf16": np.dtype(np.uint16),
        "int8": np.dtype(np.int8),
    }
    codes: np.ndarray = piece.view(code_dtypes.get(codec.name, np.dtype(np.uint8)))
    return codes


class CompressingTrainer:
    """A node trainer whose pseudo-gradients go through a codec with error feedback.

    It trains with ``trainer`` and returns the decoded update (the values the coordinator
    averages), keeping the residual in its ``state_dict`` under ``compression/residual/``.
    ``last_body_bytes`` is the size of the last update's compressed body
    (:func:`encode_body`).
    """

    STATE_PREFIX = "compression/residual/"

    def __init__(
        self, trainer: NodeTrainer, codec: Codec, node_id: str, error_feedback: bool = True
    ) -> None:
        self.trainer = trainer
        self.node_id = node_id
        self.feedback = ErrorFeedback(codec, error_feedback)
        self.last_body_bytes = 0

    def train(self, round_id: int, parameters: TensorMap) -> TrainResult:
        """Train, encode the pseudo-gradient and return its decoded values."""
        gradients, loss, samples = self.trainer.train(round_id, parameters)
        encoded, decoded = self.feedback.encode_and_decode(gradients)
        metadata = {
            "node_id": self.node_id,
            "round_id": str(round_id),
            "loss": repr(float(loss)),
            "samples_used": str(samples),
        }
        self.last_body_bytes = len(encode_body(encoded, metadata))
        return decoded, loss, samples

    def state_dict(self) -> TensorMap:
        """The trainer's state and the residual."""
        state = dict(self.trainer.state_dict())
        state |= {self.STATE_PREFIX + key: value for key, value in self.feedback.residual.items()}
        return state

    def load_state_dict(self, state: TensorMap) -> None:
        """Restore :meth:`state_dict`."""
        prefix = self.STATE_PREFIX
        self.feedback.residual = {
            name.removeprefix(prefix): np.array(value)
            for name, value in state.items()
            if name.startswith(prefix)
        }
        self.trainer.load_state_dict({k: v for k, v in state.items() if not k.startswith(prefix)})


def compressing(
    factory: TrainerFactory, codec: Codec, error_feedback: bool = True
) -> TrainerFactory:
    """``factory`` whose trainers compress their updates (:class:`CompressingTrainer`)."""

    def make(node_id: str, config: TrainingConfig) -> CompressingTrainer:
        return CompressingTrainer(factory(node_id, config), codec, node_id, error_feedback)

    return make
