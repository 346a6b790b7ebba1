"""Byzantine nodes in the built-in simulation: what each attack sends, that screening stops NaN
and inflated sample counts before any rule sees them, and that robust rules hold a real run
of the built-in task near the clean run where the mean does not."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aumai_fedtrain import DiLoCoCoordinator, LocalUpdate, TrainingConfig
from aumai_fedtrain.models import AggregationConfig, AggregationRule, TensorMap
from aumai_fedtrain.robust import RobustAggregator
from aumai_fedtrain.simulation import (
    ATTACKS,
    Attack,
    Byzantine,
    ByzantineSimulation,
    SimulationProvider,
    corrupt,
    simulated_nodes,
)
from tests.helpers import CLI_TIMEOUT
from tests.test_robust import round_updates

ATTACKER = "node-003"
ROUNDS = 10


def _updates(count: int = 5) -> list[LocalUpdate]:
    return round_updates(count, size=40, samples=320)


def _attack(attack: Attack, updates: Sequence[LocalUpdate], seed: int = 0) -> LocalUpdate:
    """Node ``node-001``'s update under ``attack`` (the others' must be left alone)."""
    attacked = corrupt(updates, Byzantine(attack, frozenset({"node-001"})), seed)
    for before, after in zip(updates, attacked, strict=True):
        if before.node_id != "node-001":
            assert after is before
    return attacked[1]


def _rms(gradients: TensorMap) -> float:
    return math.sqrt(np.mean(np.concatenate([v.ravel() for v in gradients.values()]) ** 2))


def test_each_attack_sends_what_it_says() -> None:
    updates = _updates()
    honest = updates[1]
    scaled = _attack("scale", updates)
    assert all(np.array_equal(scaled.gradients[k], honest.gradients[k] * 100) for k in "wb")
    flipped = _attack("sign_flip", updates)
    assert all(np.array_equal(flipped.gradients[k], -honest.gradients[k]) for k in "wb")
    noise = _attack("noise", updates)
    assert _rms(noise.gradients) == pytest.approx(10 * _rms(honest.gradients), rel=0.05)
    assert _attack("noise", updates).gradients["w"].tobytes() == noise.gradients["w"].tobytes()
    assert (
        _attack("noise", updates, seed=1).gradients["w"].tobytes() != noise.gradients["w"].tobytes()
    )
    alie = _attack("alie", updates)
    others = np.stack([u.gradients["w"] for i, u in enumerate(updates) if i != 1])
    np.testing.assert_allclose(alie.gradients["w"], others.mean(axis=0) - others.std(axis=0))
    inflated = _attack("inflate_samples", updates)
    assert inflated.samples_used == 320_000
    assert inflated.gradients is honest.gradients
    assert all(np.isnan(v).all() for v in _attack("nan", updates).gradients.values())


def test_bad_attack_settings_are_value_errors() -> None:
    with pytest.raises(ValueError, match="unknown attack 'poison'"):
        Byzantine("poison", frozenset())  # type: ignore[arg-type]
    updates = _updates(2)
    everyone = Byzantine("alie", frozenset(u.node_id for u in updates))
    with pytest.raises(ValueError, match="alie attack needs at least one honest update"):
        corrupt(updates, everyone, 0)


def _run(
    rule: AggregationRule, attack: Attack | None, rounds: int = ROUNDS, **options: Any
) -> list[float]:
    """Eval losses per round of the built-in task, 8 nodes, node-003 attacking; ``options``
    are further :class:`AggregationConfig` fields."""
    config = TrainingConfig(
        num_nodes=8,
        global_rounds=rounds,
        aggregation=AggregationConfig(rule=rule, krum_f=2, **options),
    )
    provider = (
        SimulationProvider()
        if attack is None
        else ByzantineSimulation(Byzantine(attack, frozenset({ATTACKER})))
    )
    result = DiLoCoCoordinator().run_training(config, simulated_nodes(8), provider)
    losses = [record.eval_loss for record in result.history]
    assert all(loss is not None for loss in losses)
    return [float(loss) for loss in losses if loss is not None]


@pytest.mark.parametrize("attack", ["nan", "inflate_samples"])
@pytest.mark.parametrize("rule", ["mean", "median"])
def test_screening_stops_nan_and_inflated_samples_before_any_rule(
    monkeypatch: pytest.MonkeyPatch, rule: AggregationRule, attack: Attack
) -> None:
    seen: list[set[str]] = []
    average = RobustAggregator.average

    def spy(
        self: RobustAggregator,
        updates: Sequence[LocalUpdate],
        previous: Any = None,
        median: Any = None,
    ) -> TensorMap:
        seen.append({update.node_id for update in updates})
        return average(self, updates, previous, median)

    running_sum = RobustAggregator.running_sum

    class SpySum:
        """The mean folded as updates arrive: which nodes it folds, per round."""

        def __init__(self, aggregator: RobustAggregator) -> None:
            self.total = running_sum(aggregator)
            self.nodes: set[str] = set()

        def fold(self, updates: Any, weights: Any, labels: Any = None) -> None:
            self.nodes.update(labels)
            self.total.fold(updates, weights, labels)

        def finish(self) -> TensorMap:
            seen.append(self.nodes)
            return self.total.finish()

    monkeypatch.setattr(RobustAggregator, "average", spy)
    monkeypatch.setattr(RobustAggregator, "running_sum", lambda self: SpySum(self))
    config = TrainingConfig(num_nodes=8, global_rounds=2, aggregation=AggregationConfig(rule=rule))
    provider = ByzantineSimulation(Byzantine(attack, frozenset({ATTACKER})))
    result = DiLoCoCoordinator().run_training(config, simulated_nodes(8), provider)
    assert result.rounds_completed == 2
    assert seen == [{f"node-{i:03d}" for i in range(8)} - {ATTACKER}] * 2
    reason = {"nan": "non-finite values", "inflate_samples": "claims 320000 samples"}[attack]
    for record in result.history:
        assert reason in record.dropped[ATTACKER]
        assert math.isfinite(record.eval_loss or math.nan)


def test_robust_rules_hold_a_scaled_attacker_that_wrecks_the_mean() -> None:
    clean = _run("mean", None)[-1]
    assert _run("mean", "scale")[-1] > 3 * clean
    rules: list[AggregationRule] = ["median", "trimmed_mean", "centered_clip", "krum"]
    for rule in rules:
        assert _run(rule, "scale")[-1] < 1.25 * clean, rule


@pytest.mark.parametrize("rule", ["median", "centered_clip"])
def test_bucketed_rules_hold_a_scaled_attacker_through_the_coordinator(
    rule: AggregationRule,
) -> None:
    clean = _run("mean", None)[-1]
    bucketed = _run(rule, "scale", bucket_size=2)
    assert bucketed[-1] < 1.25 * clean
    assert bucketed != _run(rule, "scale")  # the buckets changed what the rule saw


@pytest.mark.parametrize("attack", ["sign_flip", "noise", "alie"])
def test_the_recommended_rule_holds_every_value_attack(attack: Attack) -> None:
    clean = _run("mean", None)[-1]
    assert _run("centered_clip", attack)[-1] < 1.25 * clean


def test_every_attack_is_listed() -> None:
    assert set(ATTACKS) == {"scale", "sign_flip", "noise", "alie", "inflate_samples", "nan"}


def test_the_attack_experiment_script_prints_its_table() -> None:
    script = Path(__file__).resolve().parents[1] / "examples" / "robust_attacks.py"
    completed = subprocess.run(
        [sys.executable, str(script), "--quick", "--seeds", "0", "--attacks", "scale", "nan"],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert "| attack | mean | median | trimmed_mean | centered_clip | krum |" in lines
    assert [line.split(" |")[0] for line in lines if line.startswith("| ") and "(" in line] == [
        "| none",
        "| scale",
        "| nan",
    ]
    assert "| none | " in completed.stdout and "(+0.0%)" in completed.stdout


def _script(*options: str) -> subprocess.CompletedProcess[str]:
    script = Path(__file__).resolve().parents[1] / "examples" / "robust_attacks.py"
    return subprocess.run(
        [sys.executable, str(script), "--quick", "--seeds", "0", *options],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def test_the_attack_script_screens_one_rule_with_options() -> None:
    options = ["--attacks", "alie", "--rules", "centered_clip", "--processes", "2"]
    completed = _script(*options, "--options", '{"bucket_size": 2}')
    assert completed.returncode == 0, completed.stderr
    assert 'robust rules\' options: {"bucket_size": 2}' in completed.stdout
    assert "| attack | mean | centered_clip |" in completed.stdout
    assert "| alie | not run | " in completed.stdout  # the mean runs clean only, as the baseline
    bad = _script(*options, "--options", '{"bucket_size": 0}')
    assert bad.returncode == 2
    assert (
        bad.stderr.strip()
        .splitlines()[-1]
        .endswith("error: --options: bucket_size: Input should be greater than 0")
    )


def test_the_attack_script_shows_where_the_attacker_sits() -> None:
    completed = _script("--geometry", "--attacks", "sign_flip", "alie", "nan")
    assert completed.returncode == 0, completed.stderr
    rows = [line.split(" | ") for line in completed.stdout.splitlines() if line[2:3].isalpha()]
    assert [(row[0], row[1]) for row in rows[1:]] == [  # nan never reaches a rule
        ("| sign_flip", "1"),
        ("| sign_flip", "3"),
        ("| alie", "1"),
        ("| alie", "3"),
    ]
    ratios = {row[0][2:]: float(row[4]) for row in rows[1:] if row[1] == "1"}
    # -x is farther from the honest mean than x; ALIE sits at the honest updates' distance.
    assert ratios["sign_flip"] > 1.2
    assert 0.8 < ratios["alie"] < 1.2
    # ALIE sits below the median in every coordinate, the honest updates on both sides of it;
    # the mean cosines start in round 2, when there is a previous aggregate.
    alie = [row for row in rows[1:] if row[0] == "| alie"]
    assert [float(row[8]) for row in alie] == [1.0, 1.0]
    assert all(float(row[7]) < 0.5 for row in rows[1:])
    assert [row[9] for row in rows[1:] if row[1] == "1"] == ["-", "-"]
    assert all(-1 <= float(row[9]) <= 1 for row in rows[1:] if row[1] == "3")
