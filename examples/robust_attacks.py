"""Byzantine attackers against DiLoCo: the final test loss of every aggregation rule under
every attack of :mod:`aumai_fedtrain.simulation.attacks`.

The setup is the DiLoCo H = 50 run of ``docs/experiments.md`` (8 workers with Dirichlet(0.5)
label skew, ``cluster_std = 1.5``, 16,384 samples each, 4,000 inner steps of batch 32 at inner
lr 0.003, outer Nesterov lr 0.7, momentum 0.9), through the library itself
(:class:`ByzantineSimulation` and :class:`DiLoCoCoordinator`). ``--attackers`` of the 8
workers (the last ones) attack from the first round; every rule is configured for f = 2
(trimmed mean: trim fraction 0.25; multi-Krum: f = 2). The table gives each rule's test loss
(test half of the held-out set) averaged over the seeds, and its gap to the clean run of the
plain mean, seed by seed (``diverged``: the outer step made the model non-finite). The robust
rules run with their default outlier filters (``balance_limit`` 0.5, ``reputation_warmup`` 3);
``--options '{"balance_limit": null, "reputation_warmup": null}'`` turns them off.

``python examples/robust_attacks.py`` runs the documented experiment (1 attacker, 5 seeds; long
on two cores: 5 rules x 7 cases x 5 seeds runs of 80 rounds); ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from collections.abc import Callable
from typing import cast

import numpy as np

from pydantic import ValidationError

from aumai_fedtrain.coordinator import DiLoCoCoordinator, DivergenceError
from aumai_fedtrain.models import (
    AggregationConfig,
    AggregationRule,
    LocalUpdate,
    SimulationConfig,
    TensorMap,
    TrainingConfig,
)
from aumai_fedtrain.simulation import (
    ATTACKS,
    Attack,
    Byzantine,
    ByzantineSimulation,
    SimulationProvider,
    SyntheticTask,
    mlp,
    simulated_nodes,
)

RULES: tuple[AggregationRule, ...] = ("mean", "median", "trimmed_mean", "centered_clip", "krum")
CLEAN = "none"
VALUE_ATTACKS = ("scale", "sign_flip", "noise", "alie")
"""The attacks that reach the rules (screening drops the others)."""


@dataclass
class Cell:
    """One rule under one attack: the test loss of each seed (None: diverged)."""

    rule: str
    attack: str
    losses: list[float | None] = field(default_factory=list)


def test_loss(
    config: TrainingConfig,
    rule: AggregationRule,
    attack: str,
    attackers: int,
    options: dict[str, object] | None = None,
    watch: Callable[[int, list[LocalUpdate], TensorMap], None] | None = None,
) -> float | None:
    """Final test loss of one run (None when the run diverged); ``options`` are further
    :class:`AggregationConfig` fields for the robust rules; ``watch(round, accepted updates,
    aggregate)`` sees every round."""
    extra = options if options and rule != "mean" else {}
    aggregation = AggregationConfig.model_validate(
        {"rule": rule, "trim_fraction": 0.25, "krum_f": 2, **extra}
    )
    config = config.model_copy(update={"aggregation": aggregation})
    nodes = simulated_nodes(config.num_nodes)
    provider: SimulationProvider = SimulationProvider()
    if attack != CLEAN:
        bad = frozenset(node.node_id for node in nodes[config.num_nodes - attackers :])
        provider = ByzantineSimulation(Byzantine(cast(Attack, attack), bad))
    provider.configure(config)
    coordinator = DiLoCoCoordinator()
    state = coordinator.initialize(config, nodes, provider.initial_parameters(config))
    try:
        for round_id in range(1, config.global_rounds + 1):
            updates = provider.get_updates(round_id, state, nodes)
            accepted, _ = coordinator.screen(state, updates)
            state = coordinator.run_round(state, accepted)
            if watch is not None:
                watch(round_id, accepted, state.global_weights)
    except DivergenceError:
        return None
    assert state.parameters is not None
    features, labels = SyntheticTask(config.simulation, config.seed, cache_size=0).eval_set()
    half = len(labels) // 2
    return mlp.evaluate(state.parameters, features[half:], labels[half:])[0]


def _flat(gradients: TensorMap) -> np.ndarray:
    return np.concatenate(
        [np.asarray(value, dtype=np.float64).ravel() for value in gradients.values()]
    )


def print_geometry(
    config: TrainingConfig, attacks: list[str], attackers: int, options: dict[str, object]
) -> None:
    """Where the attackers' updates sit among the honest ones in a ``centered_clip`` run (with
    ``options``): L2 norms of the honest mean, of the honest updates' and the attackers'
    distances from it, and of the errors of the rule's aggregate and of the plain mean of every
    update; then the outlier filters' statistics (``robust.exclude_outliers``): each update's
    balance about the round's coordinate-wise median, and each node's mean cosine with the
    previous round's aggregate so far (honest: the largest |balance| and the lowest mean
    cosine; attackers: the most extreme)."""

    bad = {node.node_id for node in simulated_nodes(config.num_nodes)[-attackers:]}
    previous: list[np.ndarray] = []
    cosines: dict[str, list[float]] = {}

    def watch(round_id: int, updates: list[LocalUpdate], aggregate: TensorMap) -> None:
        flat = {u.node_id: _flat(u.gradients) for u in updates}
        if previous:
            reference = previous[-1]
            for node_id, values in flat.items():
                norms = np.linalg.norm(values) * np.linalg.norm(reference)
                if norms > 0:
                    cosines.setdefault(node_id, []).append(float(values @ reference / norms))
        previous[:] = [_flat(aggregate)]
        if round_id not in (1, 10, 40, config.global_rounds):
            return
        honest = np.stack([v for node_id, v in flat.items() if node_id not in bad])
        attacking = np.stack([v for node_id, v in flat.items() if node_id in bad])
        center = honest.mean(axis=0)
        spread = float(np.median(np.linalg.norm(honest - center, axis=1)))
        everyone = np.concatenate([honest, attacking]).mean(axis=0)
        median = np.median(np.concatenate([honest, attacking]), axis=0)

        def balance(values: np.ndarray) -> np.ndarray:
            return np.asarray((values < median).mean(axis=1) - (values > median).mean(axis=1))

        def lowest_mean_cosine(nodes: list[str]) -> str:
            means = [statistics.fmean(cosines[n]) for n in nodes if cosines.get(n)]
            return f"{min(means):+.3f}" if means else "-"

        honest_cosine = lowest_mean_cosine([n for n in flat if n not in bad])
        attacker_cosine = lowest_mean_cosine([n for n in flat if n in bad])
        print(
            f"| {attack} | {round_id} | {np.linalg.norm(center):.3f} | {spread:.3f} | "
            f"{np.linalg.norm(attacking - center, axis=1).max() / spread:.2f} | "
            f"{np.linalg.norm(_flat(aggregate) - center):.3f} | "
            f"{np.linalg.norm(everyone - center):.3f} | "
            f"{np.abs(balance(honest)).max():.2f} | {np.abs(balance(attacking)).max():.2f} | "
            f"{honest_cosine} | {attacker_cosine} |"
        )

    print(
        "| attack | round | honest mean | honest distance, median | attacker / median | "
        "centered_clip error | mean error | honest abs(balance), max | attacker abs(balance) | "
        "honest mean cosine, min | attacker mean cosine |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for attack in attacks:
        previous.clear()
        cosines.clear()
        test_loss(config, "centered_clip", attack, attackers, options, watch=watch)


def gap(loss: float | None, clean: float | None) -> str:
    if loss is None:
        return "diverged"
    if clean is None:
        return "n/a"
    return f"{(loss / clean - 1) * 100:+.1f}%"


def print_table(
    cells: dict[tuple[str, str], Cell],
    attacks: list[str],
    seeds: list[int],
    rules: list[AggregationRule],
) -> None:
    clean = cells[("mean", CLEAN)].losses
    print("| attack | " + " | ".join(rules) + " |")
    print("|---|" + "---|" * len(rules))
    for attack in attacks:
        entries = []
        for rule in rules:
            if (rule, attack) not in cells:
                entries.append("not run")
                continue
            losses = cells[(rule, attack)].losses
            finite = [loss for loss in losses if loss is not None]
            mean = f"{statistics.fmean(finite):.4f}" if len(finite) == len(losses) else "diverged"
            gaps = ", ".join(gap(loss, base) for loss, base in zip(losses, clean, strict=True))
            entries.append(f"{mean} ({gaps})")
        print(f"| {attack} | " + " | ".join(entries) + " |")
    print(f"\nseeds {seeds}; in brackets each seed's gap to the clean plain mean of that seed")


def experiment_config(quick: bool = False) -> TrainingConfig:
    """The DiLoCo H = 50 setup of ``docs/experiments.md`` (seed 0); ``quick``: a tiny one."""
    simulation = SimulationConfig(
        dirichlet_alpha=0.5, cluster_std=1.5, samples_per_node=16384, eval_samples=8000
    )
    config = TrainingConfig(
        num_nodes=8,
        batch_size=32,
        local_steps=50,
        global_rounds=80,
        learning_rate=0.003,
        simulation=simulation,
    )
    if quick:
        config = config.model_copy(
            update={
                "local_steps": 5,
                "global_rounds": 3,
                "simulation": simulation.model_copy(
                    update={"hidden_units": 16, "samples_per_node": 256, "eval_samples": 200}
                ),
            }
        )
    return config


def _run(
    job: tuple[TrainingConfig, AggregationRule, str, int, dict[str, object]],
) -> float | None:
    """:func:`test_loss` of one ``(config, rule, attack, attackers, options)`` job."""
    return test_loss(*job)


def main() -> None:
    """Parse the options, run every rule under every attack and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--attackers", type=int, default=1, help="attacking workers of 8")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument(
        "--rules", nargs="+", default=list(RULES), choices=RULES, help="rules besides the mean"
    )
    parser.add_argument(
        "--options",
        type=json.loads,
        default={},
        help='further AggregationConfig fields of the robust rules, as JSON ({"bucket_size": 2})',
    )
    parser.add_argument("--processes", type=int, default=1, help="runs in parallel")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--geometry",
        action="store_true",
        help="instead: where the attackers sit among the honest updates (first seed)",
    )
    args = parser.parse_args()
    try:
        AggregationConfig.model_validate({"rule": "centered_clip", **args.options})
    except ValidationError as exc:
        error = exc.errors()[0]
        parser.error(f"--options: {'.'.join(map(str, error['loc']))}: {error['msg']}")
    # Every round of a robust rule logs the updates its filters exclude; the table is the point.
    logging.getLogger("aumai_fedtrain").setLevel(logging.ERROR)
    config = experiment_config(args.quick)
    if args.geometry:
        seeded = config.model_copy(update={"seed": args.seeds[0]})
        print_geometry(
            seeded,
            [a for a in args.attacks if a in VALUE_ATTACKS],
            args.attackers,
            args.options,
        )
        return
    attacks: list[str] = [CLEAN, *args.attacks]
    rules: list[AggregationRule] = ["mean", *(rule for rule in args.rules if rule != "mean")]
    # The clean mean is every gap's baseline; the mean under attack only when it is asked for.
    cases = [
        (rule, attack)
        for attack in attacks
        for rule in rules
        if rule != "mean" or attack == CLEAN or "mean" in args.rules
    ]
    jobs = [
        (config.model_copy(update={"seed": seed}), rule, attack, args.attackers, args.options)
        for rule, attack in cases
        for seed in args.seeds
    ]
    started = time.perf_counter()
    with ProcessPoolExecutor(args.processes) as pool:
        losses = iter(pool.map(_run, jobs))
    cells: dict[tuple[str, str], Cell] = {
        case: Cell(*case, [next(losses) for _ in args.seeds]) for case in cases
    }
    if args.json:
        print(json.dumps([asdict(cell) for cell in cells.values()], indent=2))
        return
    print(f"{args.attackers} attacker(s) of {config.num_nodes}; test loss, seed mean")
    if args.options:
        print(f"robust rules' options: {json.dumps(args.options)}")
    print_table(cells, attacks, args.seeds, rules)
    minutes = (time.perf_counter() - started) / 60
    print(f"{len(jobs)} runs in {minutes:.1f} minutes with {args.processes} process(es)")


if __name__ == "__main__":
    main()
