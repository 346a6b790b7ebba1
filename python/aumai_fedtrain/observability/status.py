"""A run's files as ``report`` and ``status`` read them: its checkpoint and metrics file.

Both work on a checkpoint folder (finished or still being written: they read the last complete
checkpoint and metrics line, and take no lock) and on a metrics file alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aumai_fedtrain.checkpoint import CHECKPOINT_FILE, Checkpoint, load_checkpoint
from aumai_fedtrain.models import RoundRecord, TrainingConfig
from aumai_fedtrain.observability.metrics_file import METRICS_FILE, MetricsFileError, read_metrics
from aumai_fedtrain.observability.records import drop_kind, total_bytes

__all__ = ["RunFiles", "RunStatus", "read_run", "read_status"]


@dataclass
class RunFiles:
    """What a run left: where, its checkpoint (if any) and one record per completed round."""

    source: Path
    folder: Path
    """Where a report of the run is written."""
    checkpoint: Checkpoint | None
    records: list[RoundRecord]


def read_run(path: str | Path) -> RunFiles:
    """Read a checkpoint folder (its checkpoint and ``metrics.jsonl``) or a metrics file.

    Records come from the metrics file, and from the checkpoint's history for rounds the file
    lacks. Raises :class:`MetricsFileError` when ``path`` holds neither, and
    :class:`~aumai_fedtrain.checkpoint.CheckpointError` for an unreadable checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        checkpoint = load_checkpoint(path)
        metrics = path / METRICS_FILE
        if checkpoint is None and not metrics.exists():
            raise MetricsFileError(
                f"{str(path)!r} holds no run: neither {CHECKPOINT_FILE} nor {METRICS_FILE}"
            )
        folder = path
    elif path.exists():
        checkpoint, metrics, folder = None, path, path.parent
    else:
        raise MetricsFileError(f"no such checkpoint folder or metrics file: {str(path)!r}")
    by_round = {record.round_id: record for record in checkpoint.history} if checkpoint else {}
    if metrics.exists():
        by_round.update((record.round_id, record) for record in read_metrics(metrics))
    records = [by_round[round_id] for round_id in sorted(by_round)]
    return RunFiles(path, folder, checkpoint, records)


@dataclass
class RunStatus:
    """Where a run stands: its config, last completed round, credits (every node of the run,
    0 for one that never contributed) and last round."""

    source: Path
    config: TrainingConfig | None
    completed_round: int
    credits: dict[str, int] = field(default_factory=dict)
    last: RoundRecord | None = None
    bytes_to_nodes: int | None = None
    bytes_from_nodes: int | None = None
    elapsed_seconds: float | None = None

    def as_json(self) -> dict[str, Any]:
        """The status as JSON-ready data (every node listed)."""
        last = self.last
        return {
            "source": str(self.source),
            "config": self.config.model_dump(mode="json") if self.config else None,
            "completed_round": self.completed_round,
            "global_rounds": self.config.global_rounds if self.config else None,
            "elapsed_seconds": self.elapsed_seconds,
            "bytes_to_nodes": self.bytes_to_nodes,
            "bytes_from_nodes": self.bytes_from_nodes,
            "credits": self.credits,
            "benched": list(last.benched) if last else [],
            "dropped": (
                {
                    node: {"reason": reason, "kind": drop_kind(reason)}
                    for node, reason in last.dropped.items()
                }
                if last
                else {}
            ),
            "last_round": last.model_dump(mode="json") if last else None,
        }


def read_status(path: str | Path) -> RunStatus:
    """The status of the run at ``path`` (see :func:`read_run`)."""
    run = read_run(path)
    checkpoint = run.checkpoint
    last = run.records[-1] if run.records else None
    bytes_to, bytes_from = total_bytes(run.records)
    return RunStatus(
        source=run.source,
        config=checkpoint.config if checkpoint else None,
        completed_round=last.round_id if last else 0,
        credits=(
            {node: 0 for node in checkpoint.node_ids} | checkpoint.credits if checkpoint else {}
        ),
        last=last,
        bytes_to_nodes=bytes_to,
        bytes_from_nodes=bytes_from,
        elapsed_seconds=checkpoint.elapsed if checkpoint else None,
    )
