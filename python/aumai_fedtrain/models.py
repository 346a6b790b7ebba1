"""Pydantic data model of a federated run.

Tensor-valued fields (gradients, weights, parameters, optimizer state) accept lists, nested
lists and NumPy arrays and hold NumPy arrays in their own float type: float64, float32 and
float16 arrays keep their dtype (in native byte order), integer arrays, other floats, lists
and numbers become float64 (see :func:`to_tensor`); their JSON form is nested lists of
floats (``NaN``/``Infinity`` written as ``json.dumps`` writes them), so
``Model.model_validate_json(m.model_dump_json())`` gives back an equal model. Models compare
equal by value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    WithJsonSchema,
    field_validator,
    model_validator,
)

__all__ = [
    "MAX_LISTED_NODES",
    "PHASES",
    "TENSOR_DTYPES",
    "AggregationConfig",
    "CompressionCodec",
    "CompressionConfig",
    "FederatedNode",
    "GlobalState",
    "LocalUpdate",
    "NodeReputation",
    "NodeTimes",
    "RoundRecord",
    "SimulationConfig",
    "Tensor",
    "TensorMap",
    "TrainingConfig",
    "TrainingResult",
]

_NUMERIC_KINDS = frozenset("iuf")
_NOT_NUMBERS = {
    "U": "holds a string, not numbers",
    "S": "holds bytes, not numbers",
    "b": "holds booleans, not numbers",
    "c": "holds complex numbers, not real numbers",
    "O": "holds values that are not numbers, or ints too large for 64 bits (e.g. None, 10**400)",
}


TENSOR_DTYPES = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16))
"""The dtypes a :data:`Tensor` keeps; every other numeric input becomes float64."""


def to_tensor(value: Any) -> np.ndarray:
    """Convert a number, (nested) list or array to a float array, keeping float32 and float16.

    float64, float32 and float16 arrays keep their dtype (no copy in native byte order; other
    byte orders are converted to the native one); integer arrays, long doubles, NumPy
    scalars, lists and numbers become float64, as JSON lists always are. Raises
    ``ValueError`` for strings, booleans, objects and ragged nested lists.
    """
    if isinstance(value, np.ndarray) and value.dtype.newbyteorder("=") in TENSOR_DTYPES:
        return value if value.dtype.isnative else value.astype(value.dtype.newbyteorder("="))
    if isinstance(value, str | bytes):
        raise ValueError(_NOT_NUMBERS["U" if isinstance(value, str) else "S"])
    if isinstance(value, Mapping):
        raise ValueError("holds a mapping, not a number or a (nested) list of numbers")
    try:
        array = np.asarray(value)
    except ValueError as exc:
        raise ValueError(f"not a rectangular array of numbers ({exc})") from None
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise ValueError(
            _NOT_NUMBERS.get(array.dtype.kind, f"holds {array.dtype} values, not numbers")
        )
    return array.astype(np.float64, copy=False)


def stored_dtype(dtype: np.dtype) -> np.dtype:
    """The little-endian dtype the wire and checkpoints hold values of ``dtype`` in: its own
    float type (float64, float32 or float16), or float64 for any other number."""
    size = dtype.itemsize if dtype.kind == "f" and dtype.itemsize <= 8 else 8
    return np.dtype(f"<f{size}")


def stored_name(dtype: np.dtype) -> str:
    """The safetensors name of :func:`stored_dtype`: ``F64``, ``F32`` or ``F16``."""
    return f"F{8 * stored_dtype(dtype).itemsize}"


def as_stored(value: Any) -> np.ndarray:
    """``value`` as a C-ordered array of its :func:`stored_dtype` (no copy when it is one)."""
    array = np.asarray(value)
    return np.asarray(array, dtype=stored_dtype(array.dtype), order="C")


def _tensor_to_json(array: np.ndarray) -> Any:
    return array.tolist()


Tensor = Annotated[
    np.ndarray,
    PlainValidator(to_tensor),
    PlainSerializer(_tensor_to_json, when_used="json"),
    WithJsonSchema({"type": "array", "items": {}}),
]
"""A float64, float32 or float16 NumPy array (see :func:`to_tensor`); nested lists of floats in
JSON, which read back as float64."""

TensorMap = dict[str, Tensor]
"""Parameter name -> tensor."""


def values_equal(left: Any, right: Any) -> bool:
    """Structural equality that compares arrays by shape and value (NaN equal to NaN)."""
    if isinstance(left, np.ndarray) or isinstance(right, np.ndarray):
        if not (isinstance(left, np.ndarray) and isinstance(right, np.ndarray)):
            return False
        return left.shape == right.shape and bool(np.array_equal(left, right, equal_nan=True))
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(values_equal(left[k], right[k]) for k in left)
    if isinstance(left, list | tuple) and isinstance(right, list | tuple):
        return len(left) == len(right) and all(
            values_equal(a, b) for a, b in zip(left, right, strict=True)
        )
    if isinstance(left, float) and isinstance(right, float) and left != left and right != right:
        return True  # NaN == NaN for value equality
    return bool(left == right)


class _Model(BaseModel):
    """Base: unknown fields are errors, non-finite floats serialise as JSON constants."""

    model_config = ConfigDict(
        extra="forbid", ser_json_inf_nan="constants", validate_assignment=True
    )

    def __eq__(self, other: object) -> bool:
        if type(self) is not type(other):
            return NotImplemented
        assert isinstance(other, BaseModel)
        return values_equal(self.__dict__, other.__dict__)

    __hash__ = None  # type: ignore[assignment]


PositiveInt = Annotated[int, Field(gt=0)]


def _check_node_id(node_id: str) -> str:
    if "/" in node_id or any(char.isspace() for char in node_id):
        raise ValueError(f"a node id must not contain '/' or whitespace, got {node_id!r}")
    return node_id


NodeId = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_check_node_id)]
"""A node's id: 1-256 characters, no ``/`` (it names the node's state in checkpoints) and no
whitespace."""
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class FederatedNode(_Model):
    """A participant in the run: an id, a network address and capability metadata."""

    node_id: NodeId
    address: str = ""
    capabilities: dict[str, Any] = Field(default_factory=dict)
    status: Literal["idle", "training", "offline"] = "idle"
    max_samples: Annotated[int, Field(ge=0)] | None = None
    """Most samples this node may claim in one round; None: ``local_steps * batch_size``."""


class LocalUpdate(_Model):
    """What a node sends after its local steps: the pseudo-gradient, its loss and samples."""

    node_id: NodeId
    round_id: Annotated[int, Field(ge=0)]
    gradients: TensorMap
    loss: FiniteFloat
    samples_used: Annotated[int, Field(ge=0)]

    @property
    def nbytes(self) -> int:
        """Bytes of the pseudo-gradient's values as held."""
        return sum(values.nbytes for values in self.gradients.values())

    def without_tensors(self) -> LocalUpdate:
        """This update without its pseudo-gradient (``gradients`` empty): what a round's
        record of the nodes counted keeps."""
        return self.model_copy(update={"gradients": {}})


class SimulationConfig(_Model):
    """Settings of the built-in simulation: dataset, model and how data is split.

    The dataset is a Gaussian mixture: each of ``num_classes`` classes is made of
    ``clusters_per_class`` blobs with standard-normal centres and spread ``cluster_std``. Each
    node holds ``samples_per_node`` samples, with uniform classes, or class proportions drawn
    from Dirichlet(``dirichlet_alpha``) per node when it is set (smaller is more skewed). The
    model is an MLP with one hidden layer of ``hidden_units`` ReLU units, trained by AdamW with
    decoupled ``weight_decay``.
    """

    num_features: PositiveInt = 32
    num_classes: Annotated[int, Field(ge=2)] = 10
    clusters_per_class: PositiveInt = 4
    cluster_std: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    hidden_units: PositiveInt = 256
    samples_per_node: PositiveInt = 512
    eval_samples: PositiveInt = 2000
    dirichlet_alpha: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    weight_decay: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.01

    model_config = ConfigDict(
        extra="forbid", ser_json_inf_nan="constants", validate_assignment=True, strict=True
    )


AggregationRule = Literal["mean", "median", "trimmed_mean", "centered_clip", "krum"]


class AggregationConfig(_Model):
    """How the coordinator combines a round's screened updates (:mod:`aumai_fedtrain.robust`).

    ``rule`` is the weighted ``mean`` (default, weighted by ``aggregation_weights``) or a
    Byzantine-robust rule, which weighs every update equally: ``median``, ``trimmed_mean``
    (drops ``floor(trim_fraction * N)`` values per side and coordinate), ``centered_clip``
    (clip radius ``clip_radius``, None: the round's median distance from the median;
    ``clip_iterations`` steps) or multi-``krum`` (``krum_f`` assumed attackers, ``krum_m``
    selected, None: ``N - krum_f``). ``norm_clip`` first scales every update down to at most
    that multiple of the round's median update norm, whatever the rule. ``centered_clip``
    starts from ``clip_start``: the coordinate-wise ``median`` of the round, or the
    ``previous`` round's aggregate; without ``clip_radius`` its radius is
    ``clip_radius_multiple`` x the round's median distance from the start. ``bucket_size``
    > 1 first averages random buckets of that many updates (drawn from the seed and round)
    and applies the robust rule to the bucket means (not with the mean).

    Before a robust rule combines them, two filters exclude outlying updates for the round
    (:func:`aumai_fedtrain.robust.exclude_outliers`; None turns one off): the balance filter
    drops an update whose share of values below minus above the round's coordinate-wise median
    exceeds ``balance_limit`` in magnitude, and the direction reputation drops a node whose
    updates' mean cosine with the previous round's aggregate is negative once it has
    ``reputation_warmup`` of them. Never a majority is excluded. The plain ``mean`` streams
    updates as they arrive and ignores both filters.
    """

    model_config = ConfigDict(
        extra="forbid", ser_json_inf_nan="constants", validate_assignment=True, strict=True
    )

    rule: AggregationRule = "mean"
    trim_fraction: Annotated[float, Field(ge=0, lt=0.5)] = 0.25
    clip_radius: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    clip_iterations: PositiveInt = 3
    krum_f: Annotated[int, Field(ge=0)] = 2
    krum_m: PositiveInt | None = None
    norm_clip: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    clip_start: Literal["median", "previous"] = "median"
    clip_radius_multiple: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    bucket_size: PositiveInt = 1
    balance_limit: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = 0.5
    reputation_warmup: PositiveInt | None = 3

    @model_validator(mode="after")
    def _bucketing_needs_a_robust_rule(self) -> AggregationConfig:
        if self.bucket_size > 1 and self.rule == "mean":
            raise ValueError(
                f"bucket_size = {self.bucket_size} needs a robust rule (bucketing the mean "
                "changes nothing but its weights)"
            )
        return self


CompressionCodec = Literal["none", "fp16", "bf16", "int8", "int4", "e3m0"]
"""The codecs of :mod:`aumai_fedtrain.compression`."""


def check_block_size(size: int) -> int:
    """``size`` when it is a valid block size of the blockwise codecs, else ``ValueError``."""
    if not (8 <= size <= 65536 and size & (size - 1) == 0):
        raise ValueError(f"must be a power of two from 8 to 65536, got {size}")
    return size


class CompressionConfig(_Model):
    """How the nodes compress the pseudo-gradients they send (:mod:`aumai_fedtrain.compression`).

    ``codec`` is ``none`` (the default), ``fp16``, ``bf16``, ``int8``, ``int4`` or ``e3m0``;
    ``block_size`` values share a float32 scale in the blockwise codecs; with
    ``error_feedback`` each node adds what the codec lost to its next update (node state, kept
    in checkpoints; stateless nodes start every round without it).
    """

    model_config = ConfigDict(
        extra="forbid", ser_json_inf_nan="constants", validate_assignment=True, strict=True
    )

    codec: CompressionCodec = "none"
    block_size: Annotated[int, AfterValidator(check_block_size)] = 128
    error_feedback: bool = True


class TrainingConfig(_Model):
    """Configuration of a run: inner (node) and outer (coordinator) optimisation settings.

    ``max_loss`` and ``max_abs_update`` bound what a node may send: an update whose loss or
    any pseudo-gradient value exceeds them in magnitude is dropped for the round (screening).
    Config files are strict: ``"5"`` or ``true`` for a number is an error, not a coercion.
    """

    model_config = ConfigDict(
        extra="forbid", ser_json_inf_nan="constants", validate_assignment=True, strict=True
    )

    model_name: Annotated[str, Field(min_length=1)] = "mlp-synthetic"
    learning_rate: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 0.001
    batch_size: PositiveInt = 32
    local_steps: PositiveInt = 10
    global_rounds: PositiveInt = 5
    num_nodes: PositiveInt = 3
    outer_learning_rate: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 0.7
    outer_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    nesterov: bool = True
    aggregation_weights: Literal["samples", "uniform"] = "samples"
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    seed: int = 0
    max_loss: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e9
    max_abs_update: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1e4
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)


class NodeReputation(_Model):
    """A node's direction record (:attr:`AggregationConfig.reputation_warmup`): the sum of its
    updates' cosines with the previous round's aggregate, over ``rounds`` rounds."""

    cosine_sum: FiniteFloat = 0.0
    rounds: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _cosines_are_at_most_one(self) -> NodeReputation:
        if abs(self.cosine_sum) > self.rounds:
            raise ValueError(
                f"cosine_sum {self.cosine_sum:.6g} is not a sum of {self.rounds} cosines "
                "(each in [-1, 1])"
            )
        return self


class GlobalState(_Model):
    """The coordinator's view after a round.

    ``global_weights`` is the aggregated (averaged) update of the last round. When the run has
    a model, ``parameters`` holds the global model and ``momentum`` the outer optimizer's
    buffer, so a checkpointed state is all that a resume needs. ``reputation`` is each node's
    direction record of the robust rules' reputation filter (by node id; empty when it is off).
    """

    round_id: Annotated[int, Field(ge=0)] = 0
    global_weights: TensorMap = Field(default_factory=dict)
    participating_nodes: list[str] = Field(default_factory=list)
    avg_loss: FiniteFloat | None = None
    total_samples: Annotated[int, Field(ge=0)] = 0
    parameters: TensorMap | None = None
    momentum: TensorMap | None = None
    reputation: dict[str, NodeReputation] = Field(default_factory=dict)


MAX_LISTED_NODES = 64
"""Runs of at most this many nodes list every node in a :class:`RoundRecord` (participants,
per-node times); larger runs keep counts and percentiles (dropped nodes are always listed)."""

PHASES = ("collect", "verify", "aggregate", "outer_step", "evaluate", "checkpoint")
"""The coordinator's phases of a round, as timed in :attr:`RoundRecord.phase_seconds`."""

NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class NodeTimes(_Model):
    """How long the nodes took in a round.

    ``kind`` is ``"answer"`` for real nodes (from the first request to the node's last answer,
    retries included) and ``"training"`` for nodes in this process (the trainer's ``train``
    call). Percentiles cover every node timed; ``per_node`` lists them by id when the run has
    at most :data:`MAX_LISTED_NODES` nodes.
    """

    kind: Literal["answer", "training"]
    p50: NonNegativeFloat
    p90: NonNegativeFloat
    max: NonNegativeFloat
    per_node: dict[str, NonNegativeFloat] = Field(default_factory=dict)


class RoundRecord(_Model):
    """One round of a run: one line of its history and of its ``metrics.jsonl``.

    Byte counts are the bodies moved between the coordinator and the nodes in the round, each
    direction: measured on the wire for real nodes, and for nodes in this process the size of
    the safetensors bodies the same exchange would take (see ``docs/observability.md``); None
    where the provider does not report them.
    """

    round_id: PositiveInt
    avg_loss: FiniteFloat
    total_samples: Annotated[int, Field(ge=0)]
    num_participants: Annotated[int, Field(ge=0)]
    duration_seconds: Annotated[float, Field(ge=0)]
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    dropped: dict[str, str] = Field(default_factory=dict)
    """Nodes whose update did not count this round, with the reason (node id -> reason);
    benched nodes that sat the round out are here too."""
    benched: list[str] = Field(default_factory=list)
    """Nodes that were benched (not asked) this round; each is in :attr:`dropped` with why."""
    participants: list[str] = Field(default_factory=list)
    """The nodes whose update counted, when the run has at most :data:`MAX_LISTED_NODES`."""
    num_nodes: Annotated[int, Field(ge=0)] | None = None
    """How many nodes the run had this round."""
    bytes_to_nodes: Annotated[int, Field(ge=0)] | None = None
    """Bytes of the request bodies sent to the nodes this round."""
    bytes_from_nodes: Annotated[int, Field(ge=0)] | None = None
    """Bytes of the answer bodies received from the nodes this round."""
    node_times: NodeTimes | None = None
    """The nodes' answer or training times, when the provider reports them."""
    phase_seconds: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    """Seconds the coordinator spent per phase of :data:`PHASES`. ``checkpoint`` is measured
    after the round entered the checkpoint, so it is in ``metrics.jsonl`` and the records
    given to ``on_round``, not in the checkpoint's (or the result's) history."""


class TrainingResult(_Model):
    """Outcome of :meth:`DiLoCoCoordinator.run_training`."""

    final_loss: float
    total_samples: Annotated[int, Field(ge=0)]
    duration_seconds: Annotated[float, Field(ge=0)]
    rounds_completed: Annotated[int, Field(ge=0)]
    history: list[RoundRecord] = Field(default_factory=list)
    credits: dict[str, int] = Field(default_factory=dict)
    """Samples credited per node: every node of the run, 0 for one that never contributed."""
    final_state: GlobalState

    @field_validator("credits")
    @classmethod
    def _non_negative_credits(cls, credits: dict[str, int]) -> dict[str, int]:
        for node_id, samples in credits.items():
            if samples < 0:
                raise ValueError(f"credit of {node_id!r} is negative ({samples})")
        return credits
