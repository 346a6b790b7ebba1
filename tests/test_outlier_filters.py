"""The robust rules' outlier filters: the balance filter and the direction reputation
(:func:`aumai_fedtrain.robust.exclude_outliers`), their native kernel's parity with NumPy, what
they exclude in real simulated runs, the majority cap, the config and CLI options, and a
resume that keeps the nodes' reputation bit for bit."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import cast

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from aumai_fedtrain import DiLoCoCoordinator, LocalUpdate, TrainingConfig, robust
from aumai_fedtrain.backend import get_backend
from aumai_fedtrain.checkpoint import load_checkpoint
from aumai_fedtrain.cli.aggregation import with_aggregation
from aumai_fedtrain.cli.errors import InputError
from aumai_fedtrain.models import (
    AggregationConfig,
    AggregationRule,
    NodeReputation,
    SimulationConfig,
    TrainingResult,
)
from aumai_fedtrain.simulation import (
    Attack,
    Byzantine,
    ByzantineSimulation,
    SimulationProvider,
    corrupt,
    simulated_nodes,
)
from tests.helpers import run_cli
from tests.test_resume import CONFIG as RESUME_CONFIG
from tests.test_resume import reference_and_resumed
from tests.test_robust import SETTINGS, Maps, needs_native, round_updates, update_sets, values

ATTACKER = "node-007"
BALANCE = re.compile(
    r"^excluded by robust aggregation: 100% of its values below the round's median "
    r"\(balance 1\.00 > limit 0\.5\)$"
)


def _update(node: int, values: list[float], round_id: int = 1) -> LocalUpdate:
    return LocalUpdate(
        node_id=f"node-{node:03d}",
        round_id=round_id,
        gradients={"w": np.array(values)},
        loss=1.0,
        samples_used=10,
    )


def _simulated_run(
    attack: Attack | None,
    rule: AggregationRule = "centered_clip",
    rounds: int = 8,
    seed: int = 0,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    **options: object,
) -> TrainingResult:
    """A short run of 8 simulated nodes, ``node-007`` attacking with ``attack``."""
    aggregation = AggregationConfig.model_validate({"rule": rule, **options})
    config = TrainingConfig(
        num_nodes=8,
        global_rounds=rounds,
        local_steps=10,
        learning_rate=0.003,
        seed=seed,
        simulation=SimulationConfig(hidden_units=16, samples_per_node=512, eval_samples=200),
        aggregation=aggregation,
    )
    provider = SimulationProvider()
    if attack is not None:
        provider = ByzantineSimulation(Byzantine(attack, frozenset({ATTACKER})))
    return DiLoCoCoordinator().run_training(
        config, simulated_nodes(8), provider, checkpoint_dir=checkpoint_dir, resume=resume
    )


# --- the kernel: native and NumPy give the same numbers -----------------------------------------


Center = dict[str, np.ndarray] | None


@st.composite
def with_maps(draw: st.DrawFn) -> tuple[Maps, Center, Center]:
    """Updates, a centre (None, their median, or drawn values: ties are common) and a
    reference map (None or drawn) of their shapes."""
    updates = draw(update_sets())

    def drawn() -> dict[str, np.ndarray]:
        return {
            key: np.array(draw(st.lists(values, min_size=v.size, max_size=v.size))).reshape(v.shape)
            for key, v in updates[0].items()
        }

    choice = draw(st.sampled_from(["none", "median", "drawn"]))
    center = None
    if choice == "median":
        center = robust.numpy_median(updates)
    elif choice == "drawn":
        center = drawn()
    reference = drawn() if draw(st.booleans()) else None
    return updates, center, reference


@needs_native
@SETTINGS
@given(inputs=with_maps())
def test_balance_statistics_are_bit_exact_on_both_backends(
    inputs: tuple[Maps, Center, Center],
) -> None:
    updates, center, reference = inputs
    native = robust.kernels(get_backend("native")).balance_statistics(updates, center, reference)
    numpy = robust.numpy_balance_statistics(updates, center, reference)
    assert [(b, a, d.hex(), n.hex()) for b, a, d, n in native] == [
        (b, a, d.hex(), n.hex()) for b, a, d, n in numpy
    ]
    norms = robust.numpy_squared_distances(updates)
    assert [n.hex() for *_, n in numpy] == [n.hex() for n in norms]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_balance_counts_strict_sides_and_ties_on_neither(backend_name: str, dtype: type) -> None:
    kernels = robust.kernels(get_backend(backend_name))
    updates: Maps = [
        {"w": np.array([1.0, 2.0, -0.0, 5.0], dtype), "e": np.zeros((0, 3), dtype)},
        {"w": np.array([3.0, 2.0, 0.0, 1.0], dtype), "e": np.zeros((0, 3), dtype)},
    ]
    center = {"w": np.array([2.0, 2.0, 0.0, 3.0]), "e": np.zeros((0, 3))}
    reference = {"w": np.array([1.0, 0.5, 7.0, -1.0]), "e": np.zeros((0, 3))}
    statistics = kernels.balance_statistics(updates, center, reference)
    # -0.0 against 0.0 and 2.0 against 2.0 are ties: neither side
    assert statistics == [(1, 1, 1.0 + 1.0 - 5.0, 30.0), (1, 1, 3.0 + 1.0 - 1.0, 14.0)]
    single = kernels.balance_statistics(updates[:1], kernels.median(updates[:1]))
    assert single == [(0, 0, 0.0, 30.0)]  # one update is its own median
    pair = kernels.balance_statistics(updates, kernels.median(updates))
    assert pair == [(1, 1, 0.0, 30.0), (1, 1, 0.0, 14.0)]  # the centre above is their median


@needs_native
def test_the_native_kernel_checks_its_maps() -> None:
    native = robust.kernels(get_backend("native"))
    updates: Maps = [{"w": np.zeros(4), "e": np.zeros(2)}]
    with pytest.raises(ValueError, match=r"^reference has keys \['w'\], update #0 has"):
        native.balance_statistics(updates, None, {"w": np.zeros(4)})
    with pytest.raises(ValueError, match=r"shape"):
        native.balance_statistics(updates, {"w": np.zeros(3), "e": np.zeros(2)})
    with pytest.raises(ValueError, match=r"^cannot aggregate an empty list of updates$"):
        native.balance_statistics([])


# --- the filters ----------------------------------------------------------------------------------


def test_the_balance_filter_excludes_alie_and_no_honest_update(backend_name: str) -> None:
    # Prepare: 8 honest updates, the last one replaced by ALIE (mean - std per coordinate)
    updates = corrupt(round_updates(8, size=40), Byzantine("alie", frozenset({ATTACKER})), 0)
    config = AggregationConfig(rule="centered_clip")

    # Execute
    honest = robust.exclude_outliers(updates[:7], config, backend=backend_name)
    attacked = robust.exclude_outliers(updates, config, backend=backend_name)

    # Assert
    assert honest.excluded == {} and honest.kept == updates[:7]
    assert list(attacked.excluded) == [ATTACKER]
    assert BALANCE.match(attacked.excluded[ATTACKER])
    assert attacked.kept == updates[:7]
    assert attacked.reputation == {}  # round 1: no previous aggregate to score against


def test_the_majority_is_never_excluded_and_the_most_extreme_go_first(backend_name: str) -> None:
    # Prepare: median 2 everywhere; balances 0.7, 1, 0, -1, -0.8 (ties count on neither side)
    updates = [
        _update(0, [0.0] * 7 + [2.0] * 3),
        _update(1, [1.0] * 10),
        _update(2, [2.0] * 10),
        _update(3, [3.0] * 10),
        _update(4, [4.0] * 8 + [2.0] * 2),
    ]

    # Execute
    result = robust.exclude_outliers(
        updates, AggregationConfig(rule="median"), backend=backend_name
    )

    # Assert: 4 flagged, at most floor((5 - 1) / 2) = 2 excluded: the largest |balance|
    assert result.excluded == {
        "node-001": "excluded by robust aggregation: 100% of its values below the round's "
        "median (balance 1.00 > limit 0.5)",
        "node-003": "excluded by robust aggregation: 100% of its values above the round's "
        "median (balance -1.00 < -limit 0.5)",
    }
    assert list(result.spared) == ["node-004", "node-000"]
    assert [u.node_id for u in result.kept] == ["node-000", "node-002", "node-004"]
    two = robust.exclude_outliers(updates[1:4:2], AggregationConfig(rule="median"))
    assert two.excluded == {} and len(two.spared) == 2  # floor((2 - 1) / 2) = 0
    krum = robust.exclude_outliers(updates, AggregationConfig(rule="krum", krum_f=1))
    assert list(krum.excluded) == ["node-001"]  # Krum with f = 1 needs 4 of the 5 updates
    robust.aggregate(krum.kept, AggregationConfig(rule="krum", krum_f=1), [1.0] * 4)


def test_the_coordinator_warns_naming_the_flagged_nodes_it_keeps(
    caplog: pytest.LogCaptureFixture,
) -> None:
    updates = [_update(i, [float(i)] * 4) for i in range(4)]
    config = TrainingConfig(num_nodes=4, aggregation=AggregationConfig(rule="median"))
    coordinator = DiLoCoCoordinator()
    state = coordinator.initialize(config, simulated_nodes(4))
    with caplog.at_level(logging.WARNING, logger="aumai_fedtrain"):
        state = coordinator.run_round(state, updates)
    assert state.participating_nodes == ["node-001", "node-002", "node-003"]
    messages = [record.getMessage() for record in caplog.records]
    assert (
        "round 1: robust aggregation flagged 4 of 4 updates but never excludes a majority: it "
        "excludes the 1 most extreme and keeps node-001, node-002, node-003" in messages
    )
    assert any(
        m.startswith("round 1: 1 of 4 updates excluded (node-000: excluded by") for m in messages
    )


def test_reputation_scores_before_deciding_and_lets_a_node_recover(backend_name: str) -> None:
    # Prepare: node-000 has pushed against the global model for 5 rounds (mean cosine -0.1)
    previous = {"w": np.array([1.0, 1.0, 0.0, 0.0])}
    updates = [_update(i, [1.0, 1.0, float(i), -float(i)], round_id=7) for i in range(5)]
    reputation = {"node-000": NodeReputation(cosine_sum=-0.5, rounds=5)}
    config = AggregationConfig(rule="centered_clip", balance_limit=None)

    # Execute: it now sends an update along the global model's direction (cosine 1)
    result = robust.exclude_outliers(updates, config, previous, reputation, backend_name)
    against = [u.model_copy(update={"gradients": {"w": -u.gradients["w"]}}) for u in updates[:1]]
    still = robust.exclude_outliers(
        [*against, *updates[1:]], config, previous, reputation, backend_name
    )

    # Assert: (-0.5 + 1) / 6 > 0 keeps it; every node is scored, excluded or not
    assert result.excluded == {}
    assert result.reputation["node-000"].cosine_sum == pytest.approx(0.5)
    assert result.reputation["node-000"].rounds == 6
    assert result.reputation["node-001"].rounds == 1
    assert still.excluded == {
        "node-000": "excluded by robust aggregation: its updates point against the global "
        "model (mean cosine -0.250 over 6 rounds)"
    }
    zero = [_update(0, [0.0] * 4, round_id=7), *updates[1:]]
    assert robust.exclude_outliers(zero, config, previous, reputation).reputation[
        "node-000"
    ] == NodeReputation(cosine_sum=-0.5, rounds=5)  # an update of norm zero has no direction
    # A previous aggregate of other keys (a run without a model that gained one) scores
    # nothing, and the records still decide.
    other = robust.exclude_outliers(
        [*against, *updates[1:]], config, {"v": np.zeros(4)}, reputation
    )
    assert other.reputation == reputation
    assert list(other.excluded) == ["node-000"]


def test_a_run_without_a_model_may_gain_a_key_with_the_reputation_on() -> None:
    # Prepare: no model, so the updates define the keys; round 2 brings a new one
    config = TrainingConfig(num_nodes=4, aggregation=AggregationConfig(rule="centered_clip"))
    coordinator = DiLoCoCoordinator()
    state = coordinator.initialize(config, simulated_nodes(4))
    first = [_update(i, [1.0 + i, 2.0, 3.0, 4.0 - i]) for i in range(4)]
    second = [
        u.model_copy(update={"round_id": 2, "gradients": {**u.gradients, "b": np.ones(2)}})
        for u in first
    ]

    # Execute
    state = coordinator.run_round(coordinator.run_round(state, first), second)

    # Assert: the round counts every update; the previous aggregate had no "b", so no cosine
    assert state.round_id == 2 and len(state.participating_nodes) == 4
    assert set(state.global_weights) == {"w", "b"}
    assert state.reputation == {}


def test_a_cosine_is_clamped_so_tiny_values_buy_no_record(backend_name: str) -> None:
    # Prepare: values whose squares underflow in the norm but not in the dot product (a
    # "cosine" of hundreds unclamped), aligned with the previous aggregate
    config = AggregationConfig(rule="median", reputation_warmup=1, balance_limit=None)
    updates = round_updates(8, size=300)
    previous = {key: np.sign(value) + 1.0 for key, value in updates[0].gradients.items()}
    tiny = {key: 1.5e-162 * np.sign(value) for key, value in previous.items()}
    tiny["w"].flat[0] = 1.6e-162  # its square rounds up to the smallest subnormal, not to 0
    shielded = [updates[0].model_copy(update={"gradients": tiny}), *updates[1:]]

    # Execute
    result = robust.exclude_outliers(shielded, config, previous, {}, backend_name)

    # Assert: at most one cosine's worth
    assert 0.0 < result.reputation[shielded[0].node_id].cosine_sum <= 1.0


def test_a_reputation_record_holds_only_cosines() -> None:
    assert NodeReputation(cosine_sum=-3.0, rounds=3).rounds == 3
    for cosine_sum, rounds in ((-1e308, 10**18), (1.5, 1), (0.5, 0)):
        with pytest.raises(ValidationError, match="is not a sum of"):
            NodeReputation(cosine_sum=cosine_sum, rounds=rounds)


def test_the_mean_and_filters_turned_off_exclude_nothing() -> None:
    updates = corrupt(round_updates(8, size=40), Byzantine("alie", frozenset({ATTACKER})), 0)
    previous = {key: -value for key, value in updates[0].gradients.items()}
    records = {ATTACKER: NodeReputation(cosine_sum=-9.0, rounds=9)}
    for config in (
        AggregationConfig(rule="mean"),
        AggregationConfig(rule="krum", balance_limit=None, reputation_warmup=None),
    ):
        result = robust.exclude_outliers(updates, config, previous, records)
        assert result.excluded == {} and result.kept == updates and result.reputation == records


@pytest.mark.parametrize("rule", ["median", "centered_clip"])
def test_the_rules_take_the_filters_median_to_the_last_bit(backend_name: str, rule: str) -> None:
    updates = round_updates(7, size=6)
    config = AggregationConfig.model_validate({"rule": rule})
    weights = [1.0] * len(updates)
    exclusions = robust.exclude_outliers(updates, config, backend=backend_name)

    computed = robust.aggregate(updates, config, weights, backend_name)
    given = robust.aggregate(updates, config, weights, backend_name, median=exclusions.median)

    assert exclusions.excluded == {} and exclusions.median is not None
    assert computed.keys() == given.keys()
    for key, value in computed.items():
        assert value.dtype == given[key].dtype
        assert value.tobytes() == given[key].tobytes()


@pytest.mark.parametrize("options", [{"norm_clip": 1.0}, {"bucket_size": 2}])
def test_a_median_of_other_inputs_is_not_taken(options: dict[str, object]) -> None:
    updates = round_updates(6, size=3)
    config = AggregationConfig.model_validate({"rule": "median", **options})
    wrong = {key: np.full_like(value, 1e6) for key, value in updates[0].gradients.items()}

    result = robust.aggregate(updates, config, [1.0] * 6, "python", median=wrong)

    assert all(np.all(np.abs(value) < 1e5) for value in result.values())


@pytest.mark.parametrize("rule", ["median", "centered_clip"])
def test_a_round_with_nothing_excluded_computes_the_median_once(
    monkeypatch: pytest.MonkeyPatch, rule: AggregationRule
) -> None:
    medians: list[int] = []

    def counted(updates: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        medians.append(len(updates))
        return robust.numpy_median(updates)

    monkeypatch.setattr(robust._NumpyKernels, "median", staticmethod(counted))
    config = TrainingConfig(
        num_nodes=5, aggregation=AggregationConfig.model_validate({"rule": rule})
    )
    coordinator = DiLoCoCoordinator(backend="python")
    updates = round_updates(5, size=3)
    state = coordinator.initialize(config, simulated_nodes(5))

    coordinator.run_round(state, updates)
    once = list(medians)
    corrupted = corrupt(updates, Byzantine("alie", frozenset({"node-004"})), 0)
    exclusions = robust.exclude_outliers(corrupted, config.aggregation, backend="python")
    excluded = exclusions.excluded
    medians.clear()
    coordinator.run_round(state, corrupted)

    assert once == [5]
    # Updates excluded: the rule's median is of the others, computed again.
    assert "node-004" in excluded and medians == [5, 5 - len(excluded)]
    assert exclusions.median is None  # (it was the median of all five)


# --- real simulated runs --------------------------------------------------------------------------


def test_no_update_is_excluded_in_clean_runs() -> None:
    for seed in (0, 1):
        result = _simulated_run(None, seed=seed)
        assert [record.dropped for record in result.history] == [{}] * 8
        assert result.final_state is not None
        assert all(record.rounds == 7 for record in result.final_state.reputation.values())


def test_alie_is_excluded_by_balance_every_round_and_left_uncredited() -> None:
    result = _simulated_run("alie")
    for record in result.history:
        assert list(record.dropped) == [ATTACKER]
        assert BALANCE.match(record.dropped[ATTACKER])
        assert ATTACKER not in record.participants
    assert result.credits[ATTACKER] == 0
    assert result.credits["node-000"] > 0


@pytest.mark.parametrize("warmup", [1, 3, 5])
def test_reputation_excludes_a_sign_flipper_after_the_warmup_and_not_before(warmup: int) -> None:
    # Execute: scored from round 2 on, so its count reaches the warm-up in round warmup + 1
    result = _simulated_run("sign_flip", reputation_warmup=warmup)

    # Assert
    dropped = [record.dropped for record in result.history]
    assert dropped[:warmup] == [{}] * warmup
    for rounds, record in enumerate(dropped[warmup:], start=warmup):
        assert list(record) == [ATTACKER]
        assert re.fullmatch(
            r"excluded by robust aggregation: its updates point against the global model "
            rf"\(mean cosine -0\.\d{{3}} over {rounds} rounds\)",
            record[ATTACKER],
        )
    assert result.final_state is not None
    assert result.final_state.reputation[ATTACKER].rounds == 7  # scored while excluded
    clean = _simulated_run("sign_flip", reputation_warmup=warmup, rounds=warmup)
    assert result.credits[ATTACKER] == clean.credits[ATTACKER] > 0


def test_a_resumed_run_keeps_the_reputation_bit_for_bit(tmp_path: Path) -> None:
    # Prepare: an uninterrupted run; a second one stopped after round 2 (before any exclusion)
    reference = _simulated_run("sign_flip", checkpoint_dir=tmp_path / "reference")
    _simulated_run("sign_flip", rounds=2, checkpoint_dir=tmp_path / "resumed")
    stopped = load_checkpoint(tmp_path / "resumed")
    assert stopped is not None and stopped.state.reputation[ATTACKER].rounds == 1

    # Execute
    resumed = _simulated_run("sign_flip", checkpoint_dir=tmp_path / "resumed", resume=True)

    # Assert: the same exclusions, credits and state (reputation floats included, exactly)
    assert [r.dropped for r in resumed.history] == [r.dropped for r in reference.history]
    assert ATTACKER in resumed.history[3].dropped
    assert resumed.credits == reference.credits
    assert resumed.final_state == reference.final_state
    assert resumed.final_state is not None and reference.final_state is not None
    for node, record in reference.final_state.reputation.items():
        assert resumed.final_state.reputation[node].cosine_sum.hex() == record.cosine_sum.hex()


def test_a_robust_run_killed_with_sigkill_resumes_with_its_reputation(tmp_path: Path) -> None:
    # Prepare / Execute: a centered_clip run uninterrupted, and one SIGKILLed after round 3
    options = ["--aggregation", "centered_clip", "--reputation-warmup", "2"]
    expected, actual, reached, _ = reference_and_resumed(
        tmp_path, json.dumps(RESUME_CONFIG), options, kill_at=3
    )

    # Assert: every node's record, and so the state, bit for bit
    rounds, nodes = cast(int, RESUME_CONFIG["global_rounds"]), cast(int, RESUME_CONFIG["num_nodes"])
    assert 3 <= reached < rounds
    assert len(expected.state.reputation) == nodes
    assert actual.state == expected.state
    for node, record in expected.state.reputation.items():
        assert record.rounds == rounds - 1
        assert actual.state.reputation[node].cosine_sum.hex() == record.cosine_sum.hex()
    assert [r.dropped for r in actual.history] == [r.dropped for r in expected.history]
    assert actual.credits == expected.credits


# --- configuration and command line ---------------------------------------------------------------


def test_the_filter_options_are_validated() -> None:
    default = AggregationConfig()
    assert (default.balance_limit, default.reputation_warmup) == (0.5, 3)
    AggregationConfig(rule="median", balance_limit=1.0, reputation_warmup=None)
    AggregationConfig(rule="median", balance_limit=None, reputation_warmup=1)
    for bad in (
        {"balance_limit": 0.0},
        {"balance_limit": 1.5},
        {"balance_limit": math.nan},
        {"balance_limit": "0.5"},
        {"reputation_warmup": 0},
        {"reputation_warmup": 2.5},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AggregationConfig.model_validate({"rule": "median", **bad})


def test_the_cli_turns_filters_off_and_names_bad_values() -> None:
    config = TrainingConfig()
    given = {"rule": "median", "balance_limit": "off", "reputation_warmup": "off"}
    off = with_aggregation(config, given, simulated=True).aggregation
    assert (off.balance_limit, off.reputation_warmup) == (None, None)
    on = with_aggregation(config, {"rule": "krum", "balance_limit": 0.25}, simulated=False)
    assert (on.aggregation.balance_limit, on.aggregation.reputation_warmup) == (0.25, 3)
    with pytest.raises(InputError, match=r"--reputation-warmup applies to the robust rules"):
        with_aggregation(config, {"reputation_warmup": 2}, simulated=True)


def test_run_takes_the_filter_flags() -> None:
    # Execute
    args = ["run", "--nodes", "4", "--rounds", "2", "--json", "--aggregation", "median"]
    off = run_cli(*args, "--balance-limit", "off", "--reputation-warmup", "off")
    tight = run_cli(*args, "--balance-limit", "0.01", "--reputation-warmup", "1")
    bad = [
        run_cli(*args, "--balance-limit", "half"),
        run_cli(*args, "--balance-limit", "2"),
        run_cli("run", "--rounds", "1", "--reputation-warmup", "2"),
        run_cli("run", "--rounds", "1", "--balance-limit", "off"),
        run_cli(*args, "--reputation-warmup", "1.5"),
    ]

    # Assert: a 1% limit excludes someone (never 2 of 4), turning it off excludes no one
    assert off.returncode == 0 and tight.returncode == 0, off.stderr + tight.stderr
    assert "excluded by robust aggregation" in tight.stderr
    assert "excluded by robust aggregation" not in off.stderr
    assert json.loads(tight.stdout)["eval_loss"] != json.loads(off.stdout)["eval_loss"]
    messages = [
        "'half' is neither a number nor 'off'",
        "balance_limit (--balance-limit): Input should be less than or equal to 1",
        "--reputation-warmup applies to the robust rules",
        "--balance-limit applies to the robust rules",  # even "off": the mean has no filter
        "'1.5' is neither an integer nor 'off'",
    ]
    for result, message in zip(bad, messages, strict=True):
        assert result.returncode == 2
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) <= 3
