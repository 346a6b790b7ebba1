"""The node-trainer interface: what trains on a node, wherever the node runs.

One interface serves every place a node trains: the built-in simulation, your own model in
process (:class:`~aumai_fedtrain.providers.InProcessProvider`), a real node over HTTP
(``aumai-fedtrain node --trainer module:factory``) and, later, a Ray actor. Engines move
parameters and updates; they never know the model.

A trainer is made by a factory, ``factory(node_id, config)``, once per node, and then trains
one round per call of :meth:`NodeTrainer.train`::

    train(round_id, parameters) -> (pseudo_gradient, mean_loss, samples_used)

``parameters`` are the global model the round starts from (empty when the coordinator has no
model: start from your initial model then). Return ``parameters - trained`` per key, the mean
training loss of the round and the number of samples processed. Raise ``ValueError`` for
parameters you cannot use. :meth:`NodeTrainer.state_dict` and
:meth:`NodeTrainer.load_state_dict` carry what the node keeps across rounds (its inner
optimizer's moments, an error-feedback residual) into checkpoints, so that a resumed run
continues exactly.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from pydantic import ValidationError

from aumai_fedtrain.inputs import describe_validation_error
from aumai_fedtrain.models import LocalUpdate, TensorMap, TrainingConfig, to_tensor

__all__ = [
    "Evaluator",
    "ModelInit",
    "NodeTrainer",
    "TrainResult",
    "TrainerFactory",
    "TrainerResultError",
    "as_update",
    "checked_state",
]

TrainResult = tuple[Mapping[str, Any], float, int]
"""``(pseudo_gradient, mean_loss, samples_used)``: what :meth:`NodeTrainer.train` returns."""


@runtime_checkable
class NodeTrainer(Protocol):
    """Trains one node: local steps from the global parameters, state kept across rounds."""

    def train(self, round_id: int, parameters: TensorMap) -> TrainResult:
        """Train round ``round_id`` from ``parameters``: pseudo-gradient, loss, samples."""
        ...

    def state_dict(self) -> TensorMap:
        """What the node keeps across rounds, as named tensors (empty when stateless)."""
        ...

    def load_state_dict(self, state: TensorMap) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


TrainerFactory = Callable[[str, TrainingConfig], NodeTrainer]
"""``factory(node_id, config) -> NodeTrainer``: makes the trainer of one node."""

ModelInit = Callable[[TrainingConfig], TensorMap]
"""``model_init(config) -> parameters``: the global model a run starts from."""

Evaluator = Callable[[TensorMap], tuple[float, float]]
"""``evaluate(parameters) -> (loss, accuracy)`` of the global model on held-out data."""


class TrainerResultError(ValueError):
    """A trainer returned something that is not a valid ``(gradient, loss, samples)``."""


def as_update(result: Any, node_id: str, round_id: int) -> LocalUpdate:
    """A trainer's ``(pseudo_gradient, loss, samples_used)`` as a :class:`LocalUpdate`.

    Raises :class:`TrainerResultError` with one line saying what is wrong (a non-finite loss,
    a gradient that is not numbers, a negative sample count, a result of another shape).
    """
    try:
        gradients, loss, samples = result
        if isinstance(loss, float) and not math.isfinite(loss):
            raise TrainerResultError(
                f"non-finite loss {loss}: the node's local training diverged "
                "(a lower inner learning_rate may help)"
            )
        return LocalUpdate(
            node_id=node_id,
            round_id=round_id,
            gradients=dict(gradients),
            loss=loss,
            samples_used=operator.index(samples),
        )
    except TrainerResultError:
        raise
    except (TypeError, ValueError) as exc:
        reason = describe_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
        raise TrainerResultError(
            f"the trainer returned an invalid result (expected (pseudo_gradient, loss, "
            f"samples_used)): {reason}"
        ) from None


def checked_state(node_id: str, state: Any) -> TensorMap:
    """A trainer's ``state_dict()`` as named arrays, or a ``TypeError`` naming what is wrong.

    Names must be non-empty strings and values numbers or arrays of numbers, since the state
    goes into checkpoints.
    """
    where = f"the trainer of node {node_id!r}: state_dict()"
    if not isinstance(state, Mapping):
        raise TypeError(
            f"{where} returned {type(state).__name__}, expected a mapping name -> array"
        )
    checked: TensorMap = {}
    for name, value in state.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"{where} has a name that is not a non-empty string: {name!r}")
        try:
            checked[name] = to_tensor(value)
        except ValueError as exc:
            raise TypeError(f"{where}[{name!r}] {exc}") from None
    return checked
