"""What trackers, exporters and reports read off a :class:`RoundRecord`."""

from __future__ import annotations

import re

from aumai_fedtrain.models import RoundRecord

__all__ = ["DROP_KINDS", "drop_kind", "scalars", "total_bytes"]

# (kind, pattern at the start of a drop reason), tried in order; see docs/observability.md.
_DROP_PATTERNS: tuple[tuple[str, str], ...] = (
    ("benched", r"benched after"),
    ("timeout", r"no answer within|no memory budget free"),
    ("unreachable", r"cannot reach|node speaks"),
    ("http_error", r"HTTP \d+"),
    (
        "signature",
        r"bad signature|bad request signature|unsigned update|unsigned request|"
        r"the answer is an update of|replayed or stale",
    ),
    (
        "bad_answer",
        r"answer |malformed answer|decoding this answer|cannot handle the answer|"
        r"safetensors|JSON update",
    ),
    ("model_mismatch", r"does not match the model|gradient .* has shape|tensor .* has dtype"),
    ("diverged", r"non-finite loss"),
    ("trainer", r"the trainer returned"),
    (
        "screening",
        r"gradient .* (has non-finite values|has values beyond)|loss .* is beyond|claims |"
        r"update is for round|unknown node|sent \d+ updates",
    ),
)
_COMPILED = tuple((kind, re.compile(pattern)) for kind, pattern in _DROP_PATTERNS)
DROP_KINDS = (*(kind for kind, _ in _DROP_PATTERNS), "other")
"""The kinds :func:`drop_kind` sorts drop reasons into (a bounded set, for metric labels)."""


def drop_kind(reason: str) -> str:
    """The kind of a drop reason (one of :data:`DROP_KINDS`), for counting drops by reason."""
    for kind, pattern in _COMPILED:
        if pattern.match(reason):
            return kind
    return "other"


def scalars(record: RoundRecord) -> dict[str, float]:
    """The record's numbers by metric name (``loss/train``, ``bytes/to_nodes``, ...).

    Values a round does not have (no evaluation, bytes not reported) are left out.
    """
    values: dict[str, float | int | None] = {
        "loss/train": record.avg_loss,
        "loss/eval": record.eval_loss,
        "eval/accuracy": record.eval_accuracy,
        "nodes/participants": record.num_participants,
        "nodes/dropped": len(record.dropped),
        "nodes/benched": len(record.benched),
        "samples": record.total_samples,
        "bytes/to_nodes": record.bytes_to_nodes,
        "bytes/from_nodes": record.bytes_from_nodes,
        "time/round_seconds": record.duration_seconds,
    }
    for phase, seconds in record.phase_seconds.items():
        values[f"time/phase/{phase}"] = seconds
    if record.node_times is not None:
        for name in ("p50", "p90", "max"):
            values[f"time/node_{name}"] = getattr(record.node_times, name)
    return {name: float(value) for name, value in values.items() if value is not None}


def total_bytes(records: list[RoundRecord]) -> tuple[int | None, int | None]:
    """Bytes sent to and received from the nodes over ``records`` (None when none reports)."""
    to_nodes = [r.bytes_to_nodes for r in records if r.bytes_to_nodes is not None]
    from_nodes = [r.bytes_from_nodes for r in records if r.bytes_from_nodes is not None]
    return (sum(to_nodes) if to_nodes else None, sum(from_nodes) if from_nodes else None)
