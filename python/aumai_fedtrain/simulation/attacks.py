"""Byzantine nodes: chosen nodes of an in-process run send corrupted updates.

:class:`ByzantineSimulation` is the built-in simulation in which the :class:`Byzantine` nodes'
updates are replaced before the coordinator sees them (:func:`corrupt` does it for any list of
updates). Every attacker first trains honestly (its honest update is what the
attacks start from), then sends:

- ``scale``: its update times ``scale`` (100 by default);
- ``sign_flip``: minus its update;
- ``noise``: Gaussian noise of ``noise_multiple`` (10) times its update's RMS, drawn from
  ``(seed, node, round)``;
- ``alie`` ("a little is enough", Baruch et al. 2019): ``mu - z * sigma`` per coordinate, with
  ``mu`` and ``sigma`` (population standard deviation) over the round's honest updates and
  ``z = alie_z`` (1): the attackers collude and see the honest updates of the round;
- ``inflate_samples``: its honest update claiming ``samples_multiple`` (1000) times its samples;
- ``nan``: its update with every value NaN.

The last two never reach an aggregation rule: screening drops them (samples beyond
``max_samples``, non-finite values).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from aumai_fedtrain.models import FederatedNode, GlobalState, LocalUpdate, TensorMap
from aumai_fedtrain.simulation.provider import SimulationProvider, shard_of
from aumai_fedtrain.simulation.seeding import Stream, derive_rng

__all__ = ["ATTACKS", "Attack", "Byzantine", "ByzantineSimulation", "corrupt"]

Attack = Literal["scale", "sign_flip", "noise", "alie", "inflate_samples", "nan"]
ATTACKS: tuple[Attack, ...] = get_args(Attack)


@dataclass(frozen=True)
class Byzantine:
    """Which nodes attack, and how (see the module docstring for each attack)."""

    attack: Attack
    nodes: frozenset[str] = field(default_factory=frozenset)
    scale: float = 100.0
    noise_multiple: float = 10.0
    alie_z: float = 1.0
    samples_multiple: int = 1000

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise ValueError(
                f"unknown attack {self.attack!r}: expected one of {', '.join(ATTACKS)}"
            )
        object.__setattr__(self, "nodes", frozenset(self.nodes))


def _honest_statistics(honest: Sequence[LocalUpdate]) -> tuple[TensorMap, TensorMap]:
    if not honest:
        raise ValueError("the alie attack needs at least one honest update in the round")
    keys = honest[0].gradients
    stacks = {key: np.stack([u.gradients[key] for u in honest]) for key in keys}
    return (
        {key: stack.mean(axis=0) for key, stack in stacks.items()},
        {key: stack.std(axis=0) for key, stack in stacks.items()},
    )


def corrupt(updates: Sequence[LocalUpdate], byzantine: Byzantine, seed: int) -> list[LocalUpdate]:
    """``updates`` with those of ``byzantine.nodes`` replaced by their attack."""
    honest = [u for u in updates if u.node_id not in byzantine.nodes]
    statistics = _honest_statistics(honest) if byzantine.attack == "alie" else None
    result = []
    for update in updates:
        if update.node_id in byzantine.nodes:
            update = _attacked(update, byzantine, seed, statistics)
        result.append(update)
    return result


def _attacked(
    update: LocalUpdate,
    byzantine: Byzantine,
    seed: int,
    statistics: tuple[TensorMap, TensorMap] | None,
) -> LocalUpdate:
    gradients = update.gradients
    samples = update.samples_used
    attack = byzantine.attack
    if attack == "scale":
        gradients = {key: value * byzantine.scale for key, value in gradients.items()}
    elif attack == "sign_flip":
        gradients = {key: -value for key, value in gradients.items()}
    elif attack == "noise":
        values = np.concatenate([value.reshape(-1) for value in gradients.values()])
        rms = float(np.sqrt(np.mean(values * values))) if values.size else 0.0
        rng = derive_rng(seed, Stream.ATTACK, shard_of(update.node_id), update.round_id)
        spread = byzantine.noise_multiple * rms
        gradients = {
            key: rng.normal(0.0, spread, size=value.shape) for key, value in gradients.items()
        }
    elif attack == "alie":
        assert statistics is not None
        mean, std = statistics
        gradients = {key: mean[key] - byzantine.alie_z * std[key] for key in gradients}
    elif attack == "inflate_samples":
        samples = samples * byzantine.samples_multiple
    else:
        gradients = {key: np.full(value.shape, np.nan) for key, value in gradients.items()}
    return update.model_copy(update={"gradients": gradients, "samples_used": samples})


class ByzantineSimulation(SimulationProvider):
    """The built-in simulation with the ``byzantine`` nodes' updates replaced by their attack.

    Everything else (the model, evaluation, bytes, checkpointed node state) is the
    simulation's; ``options`` are :class:`SimulationProvider`'s.
    """

    def __init__(self, byzantine: Byzantine, **options: Any) -> None:
        super().__init__(**options)
        self.byzantine = byzantine

    def get_updates(
        self, round_id: int, state: GlobalState, nodes: list[FederatedNode]
    ) -> list[LocalUpdate]:
        """The simulation's updates, the attackers' corrupted."""
        seed = self.config.seed if self.config is not None else 0
        return corrupt(super().get_updates(round_id, state, nodes), self.byzantine, seed)
