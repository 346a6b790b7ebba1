"""Screening: the one check every update passes before any aggregation sees it.

An update counts only when it comes from a known node, once, for the expected round, with a
finite loss of at most ``config.max_loss`` in magnitude, at least one sample when the mean is
weighted by samples, at most the samples its node can process in a round
(:attr:`FederatedNode.max_samples`, by default ``local_steps * batch_size``), exactly the
model's keys and shapes, and finite pseudo-gradient values of at most ``config.max_abs_update``
in magnitude (checked for all updates of a round in one pass of the backend's ``max_abs``,
native on every core) that the model's dtype can hold. An update that counts is cast to the
model's dtype (a float64 JSON update of a float32 model becomes float32), so a value that is
finite in float64 but beyond float32's range is a dropped update, never an infinity in the
model. These bounds keep a node that holds a valid key from
overflowing the weights, the average or the outer step; they do not make a plausible but wrong
update harmless (that is what robust aggregation is for).

An :class:`~aumai_fedtrain.compression.EncodedUpdate` (a compressed answer, still encoded) is
screened from its codes and scales with the same outcome as its decoded values: keys and
shapes from its tensors, magnitudes from :func:`~aumai_fedtrain.compression.max_abs_encoded`;
it counts as it is (its values decode to the model's dtypes). :func:`screen_updates`, which
gives a round's list to rules that need the values, decodes those that count.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from aumai_fedtrain.backend import get_backend
from aumai_fedtrain.compression import Encoded, EncodedUpdate, max_abs_encoded
from aumai_fedtrain.models import FederatedNode, LocalUpdate, TensorMap, TrainingConfig

__all__ = [
    "RoundScreen",
    "duplicates_reason",
    "in_model_dtype",
    "max_samples_of",
    "model_mismatch",
    "overflow_threshold",
    "screen_update",
    "screen_updates",
]


def max_samples_of(node: FederatedNode, config: TrainingConfig) -> int:
    """Most samples ``node`` may claim in a round: its ``max_samples`` or one round's worth."""
    if node.max_samples is not None:
        return node.max_samples
    return config.local_steps * config.batch_size


def model_mismatch(
    shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]
) -> str | None:
    """Why tensors of these ``shapes`` are not an update of the ``expected`` model, or None."""
    if shapes.keys() != expected.keys():
        missing = _names(expected.keys() - shapes.keys())
        extra = _names(shapes.keys() - expected.keys())
        return f"does not match the model: missing keys {missing}, unknown keys {extra}"
    for name, shape in shapes.items():
        if shape != expected[name]:
            return f"gradient {name!r} has shape {shape}, the model's is {expected[name]}"
    return None


def _names(names: Iterable[str], shown: int = 10) -> str:
    ordered = sorted(names)
    more = len(ordered) - shown
    return f"{ordered[:shown]}" + (f" (and {more} more)" if more > 0 else "")


def overflow_threshold(dtype: np.dtype) -> float:
    """The smallest magnitude that rounds to infinity in the float ``dtype`` (its largest
    finite value plus half a step), as a float64."""
    info = np.finfo(dtype)
    return math.ldexp(1.0 - math.ldexp(1.0, -(info.nmant + 2)), info.maxexp)


def _value_problem(
    key: str, magnitude: float, bound: float, dtype: np.dtype | None = None
) -> str | None:
    """Why values whose largest magnitude is ``magnitude`` (NaN: a NaN among them) fail, when
    they must be at most ``bound`` and finite in ``dtype`` (the model's)."""
    if (
        dtype is not None
        and dtype.itemsize < 8
        and math.isfinite(magnitude)  # an infinity sent is named below, as non-finite
        and magnitude >= overflow_threshold(dtype)
    ):
        return (
            f"gradient {key!r} has values beyond the range of {dtype}, the model's dtype "
            f"(up to {magnitude:.3g})"
        )
    if magnitude <= bound:  # NaN fails the comparison
        return None
    if not math.isfinite(magnitude):
        return f"gradient {key!r} has non-finite values"
    return f"gradient {key!r} has values beyond max_abs_update={bound:g} (up to {magnitude:.3g})"


def in_model_dtype(update: LocalUpdate, dtypes: Mapping[str, np.dtype]) -> LocalUpdate:
    """``update`` with each gradient cast to its parameter's dtype in ``dtypes`` (rounded to
    nearest); ``update`` itself when every gradient already has it."""
    differ = [key for key, value in update.gradients.items() if value.dtype != dtypes[key]]
    if not differ:
        return update
    gradients = dict(update.gradients)
    for key in differ:
        gradients[key] = gradients[key].astype(dtypes[key])
    return update.model_copy(update={"gradients": gradients})


def screen_update(
    update: LocalUpdate,
    node: FederatedNode | None,
    *,
    expected_round: int,
    shapes: Mapping[str, tuple[int, ...]] | None,
    config: TrainingConfig,
    magnitudes: Sequence[float] | None = None,
    dtypes: Mapping[str, np.dtype] | None = None,
) -> str | None:
    """Why ``update`` must not count, or None when it passes.

    ``node`` is the run's node of that id (None: unknown); ``shapes`` are the model's
    parameter shapes (None: the run has no model, any keys and shapes pass) and ``dtypes``
    its dtypes, whose range each value must fit (None: float64). ``magnitudes`` are the
    largest ``|x|`` of each gradient, in the map's order (the backend's ``max_abs``), when
    the caller has them; else they are computed here.
    """
    if node is None:
        return "unknown node: not a node of this run"
    if update.round_id != expected_round:
        return f"update is for round {update.round_id}, expected round {expected_round}"
    if not math.isfinite(update.loss) or abs(update.loss) > config.max_loss:
        return (
            f"loss {update.loss:g} is beyond max_loss={config.max_loss:g} (if the node's local "
            "training diverged, a lower inner learning_rate may help)"
        )
    if update.samples_used == 0 and config.aggregation_weights == "samples":
        return "processed no samples: it has no weight in a mean weighted by samples"
    limit = max_samples_of(node, config)
    if update.samples_used > limit:
        return (
            f"claims {update.samples_used} samples, more than the {limit} it may process in a "
            "round (max_samples)"
        )
    tensors = _tensors(update)
    if shapes is not None:
        mismatch = model_mismatch({key: value.shape for key, value in tensors.items()}, shapes)
        if mismatch is not None:
            return mismatch
    if magnitudes is None:
        magnitudes = _magnitudes([update])[0]
    for key, magnitude in zip(tensors, magnitudes, strict=True):
        dtype = dtypes.get(key) if dtypes is not None else None
        problem = _value_problem(key, magnitude, config.max_abs_update, dtype)
        if problem is not None:
            return problem
    return None


class RoundScreen:
    """The screening of one round's updates, batch by batch as they arrive.

    :meth:`check` screens a batch of updates on their own (every check but duplicates, which
    the caller counts, and, in a run without a model, shape conflicts between updates), in
    one ``max_abs`` pass over the batch; :meth:`shape_conflict` is then asked, in the order
    the updates count, for those that passed.
    """

    def __init__(
        self,
        nodes: Mapping[str, FederatedNode],
        *,
        expected_round: int,
        parameters: TensorMap | None,
        config: TrainingConfig,
    ) -> None:
        self.nodes = nodes
        self.expected_round = expected_round
        self.config = config
        self.shapes: dict[str, tuple[int, ...]] | None = None
        self.dtypes: dict[str, np.dtype] | None = None
        if parameters is not None:
            self.shapes = {key: value.shape for key, value in parameters.items()}
            self.dtypes = {key: value.dtype for key, value in parameters.items()}
        self._seen_shapes: dict[str, tuple[int, ...]] = {}

    def check(self, updates: Sequence[LocalUpdate]) -> list[LocalUpdate | str]:
        """Per update, why it must not count, or the update cast to the model's dtypes."""
        magnitudes = _magnitudes(updates)
        outcomes: list[LocalUpdate | str] = []
        for update, update_magnitudes in zip(updates, magnitudes, strict=True):
            reason = screen_update(
                update,
                self.nodes.get(update.node_id),
                expected_round=self.expected_round,
                shapes=self.shapes,
                config=self.config,
                magnitudes=update_magnitudes,
                dtypes=self.dtypes,
            )
            if reason is not None:
                outcomes.append(reason)
            elif isinstance(update, EncodedUpdate):
                outcomes.append(self._encoded_outcome(update))
            elif self.dtypes is not None:
                outcomes.append(in_model_dtype(update, self.dtypes))
            else:
                outcomes.append(update)
        return outcomes

    def _encoded_outcome(self, update: EncodedUpdate) -> LocalUpdate:
        """An encoded update that passed: as it is when its tensors decode to the model's
        dtypes (or the run has no model), else decoded and cast to them."""
        dtypes = self.dtypes
        if dtypes is None or all(
            np.dtype(tensor.dtype) == dtypes[key] for key, tensor in update.encoded.items()
        ):
            return update
        return in_model_dtype(update.decoded(), dtypes)

    def shape_conflict(self, update: LocalUpdate) -> str | None:
        """In a run without a model: why a non-empty gradient's shape differs from the one
        an update that counted before sent for its key (else note the update's shapes)."""
        if self.shapes is not None:
            return None
        return _shape_conflict(_tensors(update), self._seen_shapes)


def _tensors(update: LocalUpdate) -> Mapping[str, np.ndarray | Encoded]:
    """An update's tensors: its encodings when it is still encoded, else its gradients."""
    return update.encoded if isinstance(update, EncodedUpdate) else update.gradients


def _magnitudes(updates: Sequence[LocalUpdate]) -> list[list[float]]:
    """Per update, per tensor, the largest ``|x|`` of its values: the plain updates' in one
    native pass of the backend's ``max_abs`` (on every core for large batches), the encoded
    ones' from their codes and scales."""
    plain = get_backend().max_abs(
        [{} if isinstance(update, EncodedUpdate) else update.gradients for update in updates]
    )
    return [
        max_abs_encoded(update.encoded) if isinstance(update, EncodedUpdate) else row
        for update, row in zip(updates, plain, strict=True)
    ]


def screen_updates(
    updates: Sequence[LocalUpdate],
    nodes: Mapping[str, FederatedNode],
    *,
    expected_round: int,
    parameters: TensorMap | None,
    config: TrainingConfig,
) -> tuple[list[LocalUpdate], dict[str, str]]:
    """Split ``updates`` into those that count and ``{node_id: reason}`` for those that don't.

    A node that sent more than one update has none counted. Those that count are cast to the
    dtypes of ``parameters`` (:func:`in_model_dtype`); encoded ones are decoded. Without
    ``parameters`` (a run without a model) updates may carry different keys and dtypes, but a
    key's non-empty values must have the shape of the first update that passed with it.
    """
    counts = Counter(update.node_id for update in updates)
    screen = RoundScreen(nodes, expected_round=expected_round, parameters=parameters, config=config)
    accepted: list[LocalUpdate] = []
    dropped: dict[str, str] = {}
    for update, outcome in zip(updates, screen.check(updates), strict=True):
        if counts[update.node_id] > 1:
            dropped[update.node_id] = duplicates_reason(counts[update.node_id])
            continue
        reason = outcome if isinstance(outcome, str) else screen.shape_conflict(outcome)
        if reason is not None:
            dropped[update.node_id] = reason
            continue
        assert not isinstance(outcome, str)
        accepted.append(outcome.decoded() if isinstance(outcome, EncodedUpdate) else outcome)
    return accepted, dropped


def duplicates_reason(count: int) -> str:
    """Why a node that sent ``count`` updates for one round has none counted."""
    return f"sent {count} updates for one round"


def _shape_conflict(
    gradients: Mapping[str, np.ndarray | Encoded], seen: dict[str, tuple[int, ...]]
) -> str | None:
    """Why a non-empty gradient's shape differs from the one ``seen`` for its key (else note it)."""
    for key, value in gradients.items():
        if math.prod(value.shape) and seen.get(key, value.shape) != value.shape:
            return f"gradient {key!r} has shape {value.shape}, other nodes sent {seen[key]}"
    for key, value in gradients.items():
        if math.prod(value.shape):
            seen.setdefault(key, tuple(value.shape))
    return None
