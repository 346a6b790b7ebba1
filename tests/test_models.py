"""The data model: array-backed tensors, JSON round trips, value equality, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from aumai_fedtrain import (
    FederatedNode,
    GlobalState,
    LocalUpdate,
    TrainingConfig,
    TrainingResult,
)


def make_update(**overrides: object) -> LocalUpdate:
    fields: dict[str, object] = {
        "node_id": "node-0",
        "round_id": 1,
        "gradients": {"w": [0.1, -0.2, 0.05], "b": [0.01]},
        "loss": 0.5,
        "samples_used": 64,
    }
    fields.update(overrides)
    return LocalUpdate.model_validate(fields)


def test_lists_and_integer_arrays_become_float64_arrays() -> None:
    # Prepare / Execute
    from_lists = make_update(gradients={"w": [[1, 2], [3, 4]]})
    from_ints = make_update(gradients={"w": np.array([[1, 2], [3, 4]], dtype=np.int32)})

    # Assert
    for update in (from_lists, from_ints):
        assert isinstance(update.gradients["w"], np.ndarray)
        assert update.gradients["w"].dtype == np.float64
        assert update.gradients["w"].shape == (2, 2)
    assert from_lists == from_ints


@pytest.mark.parametrize("dtype", ["<f8", "<f4", "<f2", ">f8", ">f4", ">f2"])
def test_float_arrays_keep_their_dtype_in_native_byte_order(dtype: str) -> None:
    # Prepare
    array = np.array([[0.1, -2.5], [3.0, 65504.0]], dtype=dtype)

    # Execute
    update = make_update(gradients={"w": array})
    state = GlobalState(parameters={"w": array}, momentum={"w": array})

    # Assert: the same values in the same width, shared when nothing needs converting
    for held in (update.gradients["w"], state.parameters["w"], state.momentum["w"]):
        assert held.dtype == np.dtype(dtype).newbyteorder("=")
        assert held.dtype.isnative
        assert np.array_equal(held, array)
        assert np.shares_memory(held, array) == np.dtype(dtype).isnative
    # JSON holds the values as doubles, which read back as float64
    restored = LocalUpdate.model_validate_json(update.model_dump_json())
    assert restored.gradients["w"].dtype == np.float64
    assert restored == update
    assert restored.gradients["w"].tolist() == array.tolist()


def test_long_doubles_and_numpy_scalars_become_float64() -> None:
    update = make_update(
        gradients={"w": np.array([0.5], dtype=np.longdouble), "b": np.float32(0.25)}
    )

    assert update.gradients["w"].dtype == np.float64
    assert update.gradients["b"].dtype == np.float64
    assert update.gradients["b"].tolist() == 0.25


def test_json_form_is_nested_lists_of_floats() -> None:
    update = make_update(gradients={"w": [[1.5, 2.0]], "empty": []})

    dumped = update.model_dump(mode="json")

    assert dumped["gradients"] == {"w": [[1.5, 2.0]], "empty": []}
    assert json.loads(update.model_dump_json())["gradients"]["w"] == [[1.5, 2.0]]


def test_json_round_trip_is_exact_including_awkward_floats() -> None:
    awkward = [0.1, 1e-05, 5e-324, 1.7976931348623157e308, -0.0, 1e16, 2.2250738585072014e-308]
    update = make_update(gradients={"w": awkward, "nan": [float("nan"), float("inf")]})

    restored = LocalUpdate.model_validate_json(update.model_dump_json())

    assert restored == update
    assert restored.gradients["w"].tobytes() == np.array(awkward).tobytes()


def test_models_compare_by_value() -> None:
    assert make_update() == make_update()
    assert make_update() != make_update(gradients={"w": [0.1, -0.2, 0.06], "b": [0.01]})
    assert make_update() != make_update(gradients={"w": [[0.1, -0.2, 0.05]], "b": [0.01]})
    assert make_update() != make_update(loss=0.6)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"loss": float("nan")}, "loss"),
        ({"loss": float("inf")}, "loss"),
        ({"samples_used": -1}, "samples_used"),
        ({"node_id": ""}, "node_id"),
        ({"gradients": {"w": ["a", "b"]}}, "gradients.w"),
        ({"gradients": {"w": [[1.0], [1.0, 2.0]]}}, "gradients.w"),
        ({"gradients": {"w": [True, False]}}, "gradients.w"),
        ({"extra_field": 1}, "extra_field"),
    ],
)
def test_bad_update_fields_are_named(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        make_update(**overrides)

    locations = {".".join(str(p) for p in error["loc"]) for error in info.value.errors()}
    assert field in locations


@pytest.mark.parametrize(
    "field", ["learning_rate", "batch_size", "local_steps", "global_rounds", "num_nodes"]
)
def test_config_rejects_non_positive_values(field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        TrainingConfig.model_validate({field: 0})


def test_config_rejects_unknown_keys_and_loads_the_guide_file() -> None:
    guide = {
        "model_name": "my-model-v1",
        "learning_rate": 0.001,
        "batch_size": 32,
        "local_steps": 10,
        "global_rounds": 5,
        "num_nodes": 3,
    }

    config = TrainingConfig.model_validate_json(json.dumps(guide))

    assert config.model_dump(include=set(guide)) == guide
    assert (config.outer_learning_rate, config.outer_momentum) == (0.7, 0.9)
    with pytest.raises(ValidationError, match="learning_rat"):
        TrainingConfig.model_validate({**guide, "learning_rat": 0.1})


def test_node_capabilities_and_status() -> None:
    node = FederatedNode(
        node_id="gpu-0",
        address="10.0.0.1:5000",
        capabilities={"gpu": True, "ram_gb": 80},
        status="idle",
    )

    assert node.capabilities["gpu"] is True
    with pytest.raises(ValidationError, match="status"):
        FederatedNode(node_id="n", address="a", status="sleeping")  # type: ignore[arg-type]


def test_global_state_round_trip_with_parameters_and_momentum() -> None:
    state = GlobalState(
        round_id=3,
        global_weights={"w": [0.15, 0.15]},
        participating_nodes=["a", "b"],
        avg_loss=0.45,
        total_samples=128,
        parameters={"w": np.arange(6.0).reshape(2, 3)},
        momentum={"w": np.full((2, 3), 1 / 3)},
    )

    restored = GlobalState.model_validate_json(json.dumps(state.model_dump(mode="json")))

    assert restored == state
    assert restored.parameters is not None and restored.parameters["w"].shape == (2, 3)


def test_training_result_rejects_negative_credits() -> None:
    with pytest.raises(ValidationError, match="negative"):
        TrainingResult(
            final_loss=0.1,
            total_samples=1,
            duration_seconds=0.0,
            rounds_completed=1,
            credits={"a": -1},
            final_state=GlobalState(),
        )
