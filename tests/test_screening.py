"""Screening: an update that cannot be trusted is dropped for the round, never counted.

Every hostile value reaches the coordinator through a provider (as a decoded network answer
would) and must cost the hostile node its round, not the run.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aumai_fedtrain import DiLoCoCoordinator, FederatedNode, LocalUpdate, TrainingConfig
from aumai_fedtrain.checkpoint import load_checkpoint
from aumai_fedtrain.coordinator import DivergenceError, QuorumError
from tests.helpers import HostileProvider, QuadraticProvider, run_cli

CONFIG = TrainingConfig(
    model_name="screening", learning_rate=0.3, batch_size=4, local_steps=3, global_rounds=3,
    num_nodes=3,
)  # fmt: skip
TARGETS = {"a": 1.0, "b": 3.0}
HONEST_SAMPLES = CONFIG.batch_size * CONFIG.local_steps


def nodes(*extra: FederatedNode) -> list[FederatedNode]:
    return [FederatedNode(node_id="a"), FederatedNode(node_id="b"), *extra]


def scaled(factor: float) -> Any:
    return lambda update: {"gradients": {k: v * factor for k, v in update.gradients.items()}}


HOSTILE = {
    "huge loss": (
        lambda u: {"loss": 1e308},
        "loss 1e+308 is beyond max_loss=1e+09 (if the node's local training diverged, a lower "
        "inner learning_rate may help)",
    ),
    "non-finite loss": (lambda u: {"loss": float("nan")}, "loss nan is beyond max_loss"),
    "samples beyond any integer": (
        lambda u: {"samples_used": 10**400},
        f"more than the {HONEST_SAMPLES} it may process in a round",
    ),
    "samples that would outweigh everyone": (
        lambda u: {"samples_used": 10**18},
        "claims 1000000000000000000 samples",
    ),
    "gradients that overflow the outer step": (
        lambda u: {"gradients": {"theta": np.full(3, 1.7e308)}},
        "gradient 'theta' has values beyond max_abs_update=10000 (up to 1.7e+308)",
    ),
    "infinite gradients": (
        lambda u: {"gradients": {"theta": np.array([0.0, -np.inf, 0.0])}},
        "gradient 'theta' has non-finite values",
    ),
    "NaN gradients": (scaled(float("nan")), "gradient 'theta' has non-finite values"),
    "a gradient of another shape": (
        lambda u: {"gradients": {"theta": np.zeros(4)}},
        "gradient 'theta' has shape (4,), the model's is (3,)",
    ),
    "an unknown key": (
        lambda u: {"gradients": {**u.gradients, "extra": np.zeros(1)}},
        "unknown keys ['extra']",
    ),
    "another round": (lambda u: {"round_id": u.round_id + 7}, "expected round"),
    "no samples": (lambda u: {"samples_used": 0}, "processed no samples"),
}


@pytest.mark.parametrize("attack", list(HOSTILE))
def test_a_hostile_update_is_dropped_and_the_run_equals_the_honest_nodes_run(attack: str) -> None:
    # Prepare: two honest nodes and one whose update is forged
    forge, reason = HOSTILE[attack]
    provider = HostileProvider(QuadraticProvider(TARGETS), "h", forge)
    honest_config = CONFIG.model_copy(update={"num_nodes": 2})
    honest = DiLoCoCoordinator().run_training(honest_config, nodes(), QuadraticProvider(TARGETS))

    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warnings either
        result = DiLoCoCoordinator().run_training(
            CONFIG, nodes(FederatedNode(node_id="h")), provider, min_nodes=2
        )

    # Assert: every round went on without "h", which earned nothing
    assert result.rounds_completed == CONFIG.global_rounds
    assert result.credits == {"a": 3 * HONEST_SAMPLES, "b": 3 * HONEST_SAMPLES, "h": 0}
    for record in result.history:
        assert list(record.dropped) == ["h"] and reason in record.dropped["h"]
        assert record.num_participants == 2
    assert result.final_state.parameters is not None and honest.final_state.parameters is not None
    assert (
        result.final_state.parameters["theta"].tobytes()
        == honest.final_state.parameters["theta"].tobytes()
    )


def test_a_node_may_claim_up_to_its_own_max_samples() -> None:
    generous = FederatedNode(node_id="h", max_samples=1000)
    provider = HostileProvider(QuadraticProvider(TARGETS), "h", lambda u: {"samples_used": 1000})

    result = DiLoCoCoordinator().run_training(CONFIG, nodes(generous), provider)

    assert result.credits["h"] == 3 * 1000
    assert all(not record.dropped for record in result.history)


def test_run_round_raises_for_a_caller_who_passes_a_bad_update() -> None:
    coordinator = DiLoCoCoordinator()
    state = coordinator.initialize(CONFIG, nodes(FederatedNode(node_id="h")))
    bad = LocalUpdate(
        node_id="h", round_id=1, gradients={"w": [1.0]}, loss=0.5, samples_used=10**18
    )

    with pytest.raises(ValueError, match=r"update from node 'h': claims 1000000000000000000"):
        coordinator.run_round(state, [bad])
    assert coordinator.credit_tracker.all_credits() == {}


def test_too_few_updates_after_screening_is_a_quorum_error_that_keeps_the_checkpoint(
    tmp_path: Path,
) -> None:
    # Prepare: a checkpoint of round 2, then a run in which only node "a" sends a usable update
    two_rounds = CONFIG.model_copy(update={"global_rounds": 2})
    provider = HostileProvider(QuadraticProvider(TARGETS), "h", lambda u: {"loss": 1e300})
    three = nodes(FederatedNode(node_id="h"))
    DiLoCoCoordinator().run_training(two_rounds, three, provider, checkpoint_dir=tmp_path)
    before = (tmp_path / "checkpoint.safetensors").read_bytes()

    # Execute
    with pytest.raises(QuorumError) as raised:
        DiLoCoCoordinator().run_training(
            CONFIG, three, provider, checkpoint_dir=tmp_path, resume=True, min_nodes=3
        )

    # Assert
    message = str(raised.value)
    assert message.startswith("round 3: 2 of 3 nodes sent an update that counts, the quorum is 3")
    assert "h: loss 1e+300 is beyond max_loss" in message
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == before


def test_an_outer_step_that_overflows_is_refused_and_nothing_is_saved(tmp_path: Path) -> None:
    config = CONFIG.model_copy(update={"outer_learning_rate": 1e308, "num_nodes": 2})

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DivergenceError) as raised:
            DiLoCoCoordinator().run_training(
                config, nodes(), QuadraticProvider(TARGETS), checkpoint_dir=tmp_path
            )

    message = str(raised.value)
    assert message.startswith("round 1: the outer step made parameter 'theta' non-finite")
    assert "lower outer_learning_rate (now 1e+308)" in message
    assert load_checkpoint(tmp_path) is None


def test_run_round_leaves_credits_alone_when_the_outer_step_diverges() -> None:
    config = CONFIG.model_copy(update={"outer_learning_rate": 1e308})
    coordinator = DiLoCoCoordinator()
    state = coordinator.initialize(config, nodes(), {"theta": np.zeros(3)})
    update = LocalUpdate(
        node_id="a", round_id=1, gradients={"theta": [5.0, 5.0, 5.0]}, loss=1.0, samples_used=1
    )

    with pytest.raises(DivergenceError, match="round 1"):
        coordinator.run_round(state, [update])
    assert coordinator.credit_tracker.all_credits() == {}


@pytest.mark.parametrize(
    ("settings", "needles"),
    [
        (
            {"outer_learning_rate": 1e200},
            ["DivergenceError: round 1: the global model's eval loss is", "outer_learning_rate"],
        ),
        (
            {"learning_rate": 1e200},
            ["QuorumError: round 1: 0 of 2 nodes", "lower inner learning_rate"],
        ),
    ],
)
def test_a_diverging_cli_run_names_the_setting_in_one_line(
    tmp_path: Path, settings: dict[str, float], needles: list[str]
) -> None:
    config = tmp_path / "diverge.json"
    config.write_text(TrainingConfig(num_nodes=2, global_rounds=1, **settings).model_dump_json())

    completed = run_cli("run", "--config", str(config))

    assert completed.returncode == 1, (completed.stdout, completed.stderr)
    lines = completed.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ") and "RuntimeWarning" not in completed.stderr, lines
    for needle in needles:
        assert needle in lines[-1]
    assert "Eval loss" not in completed.stdout


def float32_round(
    max_abs_update: float, gradients: dict[str, np.ndarray]
) -> tuple[DiLoCoCoordinator, Any, list[LocalUpdate]]:
    """A coordinator of a float32 model of one tensor, its round-0 state and two updates:
    node "a"'s of ``gradients`` and node "b"'s of 0.5 (float64, as JSON bodies decode)."""
    config = CONFIG.model_copy(update={"max_abs_update": max_abs_update})
    coordinator = DiLoCoCoordinator()
    state = coordinator.initialize(
        config, nodes(), parameters={"w": np.array([1.0, 2.0], dtype=np.float32)}
    )
    updates = [
        LocalUpdate(node_id="a", round_id=1, gradients=gradients, loss=0.5, samples_used=12),
        LocalUpdate(
            node_id="b", round_id=1, gradients={"w": [0.5, 0.5]}, loss=0.5, samples_used=12
        ),
    ]
    return coordinator, state, updates


def test_updates_are_cast_to_the_model_dtype_and_the_outer_state_keeps_it() -> None:
    # Prepare: a float64 update whose value rounds in float32
    coordinator, state, updates = float32_round(1e4, {"w": np.array([0.1, -0.25])})

    # Execute
    accepted, dropped = coordinator.screen(state, updates)
    after = coordinator.run_round(state, updates)

    # Assert: the updates that count hold float32, and so does everything the round made
    assert dropped == {}
    assert all(update.gradients["w"].dtype == np.float32 for update in accepted)
    assert accepted[0].gradients["w"].tolist() == np.float32([0.1, -0.25]).tolist()
    assert updates[0].gradients["w"].dtype == np.float64  # the node's update is left alone
    assert after.parameters is not None and after.momentum is not None
    for tensors in (after.parameters, after.momentum, after.global_weights):
        assert tensors["w"].dtype == np.float32
    expected = (np.float64(np.float32(0.1)) * 12 + 0.5 * 12) / 24
    assert after.global_weights["w"][0] == np.float32(expected)


def test_a_value_beyond_the_model_dtype_range_is_a_clean_drop() -> None:
    # Prepare: finite in float64, infinite in float32, within a generous max_abs_update
    coordinator, state, updates = float32_round(1e300, {"w": np.array([1e39, 0.0])})

    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow in a cast
        accepted, dropped = coordinator.screen(state, updates)
        after = coordinator.run_round(state, updates[1:])

    # Assert
    assert [update.node_id for update in accepted] == ["b"]
    assert dropped == {
        "a": "gradient 'w' has values beyond the range of float32, the model's dtype (up to 1e+39)"
    }
    assert after.parameters is not None and np.isfinite(after.parameters["w"]).all()


def test_an_infinity_sent_to_a_float32_model_is_named_non_finite() -> None:
    coordinator, state, updates = float32_round(1e300, {"w": np.array([np.inf, 0.0])})

    _, dropped = coordinator.screen(state, updates)

    assert dropped == {"a": "gradient 'w' has non-finite values"}


def test_the_largest_value_that_rounds_to_a_finite_float32_passes() -> None:
    # Prepare: just below the float32 overflow threshold (max + half a step): rounds to max
    threshold = float(np.finfo(np.float32).max) * (1 + 2.0**-25)
    below = float(np.nextafter(threshold, 0))
    coordinator, state, updates = float32_round(1e300, {"w": np.array([below, threshold])})
    updates[0] = updates[0].model_copy(update={"gradients": {"w": np.array([below, 0.0])}})

    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accepted, dropped = coordinator.screen(state, updates)

    # Assert
    assert dropped == {}
    assert accepted[0].gradients["w"][0] == np.finfo(np.float32).max


def test_a_16_bit_model_keeps_its_outer_state_in_float32() -> None:
    # Prepare
    coordinator = DiLoCoCoordinator()
    initial = {"w": np.array([1.0, 2.0], dtype=np.float16)}

    # Execute
    state = coordinator.initialize(CONFIG, nodes(), parameters=initial)
    update = LocalUpdate(
        node_id="a", round_id=1, gradients={"w": np.float16([0.5, 1e-3])}, loss=0.5,
        samples_used=12,
    )  # fmt: skip
    after = coordinator.run_round(state, [update])

    # Assert: float32 outer state, the 16-bit update widened exactly
    assert state.parameters is not None and state.momentum is not None
    assert state.parameters["w"].dtype == state.momentum["w"].dtype == np.float32
    assert after.parameters is not None and after.parameters["w"].dtype == np.float32
    assert after.momentum is not None and after.momentum["w"].dtype == np.float32
    assert after.global_weights["w"].tolist() == np.float16([0.5, 1e-3]).tolist()
