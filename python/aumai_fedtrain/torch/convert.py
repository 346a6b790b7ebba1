"""A PyTorch ``state_dict`` as a :data:`~aumai_fedtrain.models.TensorMap` of NumPy arrays, and back.

Towards NumPy (:func:`to_numpy`, :func:`state_dict_to_tensormap`) a CPU tensor shares its
memory with its array whenever NumPy has its dtype (float64, float32, float16, the integers):
no copy. ``bfloat16``, which NumPy lacks, is widened to float32 (exactly: every bfloat16 value
is a float32 value), and a tensor on another device is copied to the CPU. Booleans and complex
numbers are not model values here: a ``TypeError`` names the tensor.

Back to PyTorch (:func:`tensormap_to_state_dict`, :func:`load_tensormap`) every array becomes a
tensor of the dtype, shape and device of the model's own tensor, rounded to nearest (integer
buffers such as BatchNorm's ``num_batches_tracked`` to the nearest integer), so a round trip
through the arrays, float64 included, gives back the very same tensors.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "check_matches",
    "exchange_dtype",
    "load_tensormap",
    "state_dict_to_tensormap",
    "tensormap_to_state_dict",
    "to_numpy",
    "to_torch",
]

NamedTensors = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
"""A ``state_dict()`` or the pairs of ``named_parameters()`` / ``named_buffers()``."""


def _real(tensor: torch.Tensor) -> bool:
    return not (tensor.dtype == torch.bool or tensor.is_complex())


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """``tensor`` as a NumPy array, sharing its memory when it is on the CPU in a NumPy dtype.

    ``bfloat16`` is widened to float32 and other devices are copied to the CPU. Raises
    ``TypeError`` for booleans, complex numbers and dtypes NumPy cannot hold.
    """
    value = tensor.detach()
    if not _real(value):
        raise TypeError(f"holds {value.dtype} values, not real numbers")
    if value.dtype == torch.bfloat16:
        value = value.to(torch.float32)
    return value.cpu().numpy()


def exchange_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a pseudo-gradient of a ``dtype`` tensor is computed and sent in.

    float64 stays float64; float32, float16 and bfloat16 give float32 (the difference of two
    16-bit values is exact in float32, where a 16-bit result would round); integers give
    float64 (exact for counts below 2**53).
    """
    if dtype == torch.float64 or not dtype.is_floating_point:
        return torch.float64
    return torch.float32


def _named(tensors: NamedTensors) -> dict[str, torch.Tensor]:
    return dict(tensors.items() if isinstance(tensors, Mapping) else tensors)


def state_dict_to_tensormap(tensors: NamedTensors) -> dict[str, np.ndarray]:
    """Every tensor of a ``state_dict`` (or ``named_parameters()``) as a NumPy array.

    See :func:`to_numpy`: CPU tensors share memory with their arrays where the dtype allows.
    Raises ``TypeError`` naming a tensor NumPy cannot hold as real numbers.
    """
    arrays = {}
    for name, tensor in _named(tensors).items():
        try:
            arrays[name] = to_numpy(tensor)
        except TypeError as exc:
            raise TypeError(f"tensor {name!r}: {exc}") from None
    return arrays


def to_torch(value: Any, like: torch.Tensor) -> torch.Tensor:
    """``value`` (an array or nested list) as a tensor of ``like``'s dtype and device.

    Floats round to nearest; an integer ``like`` takes the nearest integers. The result shares
    memory with ``value`` when nothing needs converting.
    """
    array = np.asarray(value)
    if not like.dtype.is_floating_point and array.dtype.kind == "f":
        array = np.rint(array)
    with warnings.catch_warnings():  # read only: a read-only array is fine
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.as_tensor(array)
    return tensor.to(device=like.device, dtype=like.dtype)


def check_matches(tensors: Mapping[str, Any], like: NamedTensors) -> None:
    """Raise ``ValueError`` unless ``tensors`` has exactly the names and shapes of ``like``.

    The message names the missing and unexpected tensors (five of each at most), or the first
    tensor whose shape differs.
    """
    reference = _named(like)
    _check_names(tensors, reference)
    for name, target in reference.items():
        _check_shape(name, tensors[name], target)


def _check_names(tensors: Iterable[str], reference: Iterable[str]) -> None:
    given, expected = set(tensors), set(reference)
    problems = []
    for what, names in (("missing", expected - given), ("unexpected", given - expected)):
        if names:
            shown = ", ".join(repr(name) for name in sorted(names)[:5])
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            problems.append(f"{what} {shown}{more}")
    if problems:
        raise ValueError(f"the tensors do not match the model: {'; '.join(problems)}")


def _check_shape(name: str, value: Any, like: torch.Tensor) -> None:
    shape = tuple(np.shape(value))
    if shape != tuple(like.shape):
        raise ValueError(f"tensor {name!r} has shape {shape}, the model's has {tuple(like.shape)}")


def tensormap_to_state_dict(
    tensors: Mapping[str, Any], like: NamedTensors
) -> dict[str, torch.Tensor]:
    """``tensors`` as a ``state_dict`` in the dtypes, shapes and devices of ``like``.

    ``like`` is the model's ``state_dict()`` (or ``named_parameters()``); the names must be
    exactly its names. Raises ``ValueError`` naming missing or unexpected tensors, or a shape
    that differs.
    """
    reference = _named(like)
    check_matches(tensors, reference)
    return {name: to_torch(tensors[name], target) for name, target in reference.items()}


def load_tensormap(model: torch.nn.Module, tensors: Mapping[str, Any]) -> None:
    """Copy ``tensors`` into ``model``'s parameters and buffers, in place.

    The names must be exactly those of ``model.state_dict()``; each value is converted as
    :func:`tensormap_to_state_dict` converts it. Raises ``ValueError`` (names or shapes) and
    leaves the model unchanged then.
    """
    targets = model.state_dict(keep_vars=True)
    check_matches(tensors, targets)
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(to_torch(tensors[name], target))
