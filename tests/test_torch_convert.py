"""state_dict <-> TensorMap: exact round trips in each dtype, shared memory, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from aumai_fedtrain.models import GlobalState
from aumai_fedtrain.torch import (
    load_tensormap,
    state_dict_to_tensormap,
    tensormap_to_state_dict,
    to_numpy,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def model_in(dtype: torch.dtype, seed: int) -> nn.Module:
    """Linear -> BatchNorm -> Linear in ``dtype``, buffers away from their defaults, and
    awkward values (-0.0, a subnormal, the largest finite, the smallest normal) in a weight."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 2)).to(dtype)
    info = torch.finfo(dtype)
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].num_batches_tracked.fill_(123456789 + seed)
        awkward = [-0.0, info.smallest_normal / 8, info.max, -info.smallest_normal]
        model[0].weight.view(-1)[:4] = torch.tensor(awkward, dtype=dtype)
    return model


def bits(tensor: torch.Tensor) -> bytes:
    return tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_state_dict_round_trip_through_the_core_is_exact(dtype: torch.dtype) -> None:
    # Prepare: the arrays as the coordinator holds them (validated into a GlobalState)
    model, other = model_in(dtype, seed=1), model_in(dtype, seed=2)
    held = GlobalState(parameters=state_dict_to_tensormap(model.state_dict())).parameters
    assert held is not None

    # Execute
    back = tensormap_to_state_dict(held, model.state_dict())
    load_tensormap(other, held)

    # Assert: every parameter and buffer, bit for bit, in its own dtype
    expected = model.state_dict()
    assert list(back) == list(expected)
    for name, tensor in expected.items():
        assert back[name].dtype == tensor.dtype, name
        assert bits(back[name]) == bits(tensor), name
        assert bits(other.state_dict()[name]) == bits(tensor), name
    assert other[1].num_batches_tracked.item() == 123456789 + 1


def test_cpu_tensors_share_memory_with_their_arrays_and_bfloat16_widens() -> None:
    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    half = torch.ones(4, dtype=torch.float16)
    brain = torch.tensor([1.0, -2.5, 3.0e38], dtype=torch.bfloat16)

    arrays = state_dict_to_tensormap([("w", weight), ("h", half), ("b", brain)])
    weight[0, 0] = 42.0

    assert arrays["w"].dtype == np.float32 and arrays["w"][0, 0] == 42.0  # the same memory
    assert arrays["h"].dtype == np.float16 and np.shares_memory(arrays["h"], half.numpy())
    assert arrays["b"].dtype == np.float32
    assert arrays["b"].tolist() == brain.float().tolist()
    assert to_numpy(nn.Parameter(torch.zeros(2))).tolist() == [0.0, 0.0]  # needs no detach


def test_integer_buffers_take_the_nearest_integer() -> None:
    like = {"count": torch.tensor(0), "w": torch.zeros(2)}

    back = tensormap_to_state_dict({"count": np.array(11.6), "w": [1.5, -2.0]}, like)

    assert back["count"].dtype == torch.int64 and back["count"].item() == 12
    assert back["w"].tolist() == [1.5, -2.0]


def test_names_shapes_and_dtypes_that_do_not_fit_are_clear_errors() -> None:
    model = model_in(torch.float32, seed=0)
    arrays = state_dict_to_tensormap(model.state_dict())
    missing = {k: v for k, v in arrays.items() if k != "0.bias"}
    extra = {**arrays, "head.weight": np.zeros(1)}
    reshaped = {**arrays, "2.weight": np.zeros((7, 2))}
    flags = nn.Module()
    flags.register_buffer("mask", torch.ones(3, dtype=torch.bool))

    with pytest.raises(ValueError, match=r"do not match the model: missing '0\.bias'$"):
        tensormap_to_state_dict(missing, model.state_dict())
    with pytest.raises(ValueError, match=r"do not match the model: unexpected 'head\.weight'$"):
        load_tensormap(model, extra)
    with pytest.raises(
        ValueError, match=r"'2\.weight' has shape \(7, 2\), the model's has \(2, 7\)"
    ):
        load_tensormap(model, reshaped)
    with pytest.raises(TypeError, match=r"tensor 'mask': holds torch\.bool values"):
        state_dict_to_tensormap(flags.state_dict())
    assert bits(model.state_dict()["2.weight"]) == bits(model_in(torch.float32, 0)[2].weight)
