"""``metrics.jsonl``: one :class:`~aumai_fedtrain.models.RoundRecord` per line, per round.

A run appends a line after each round's checkpoint. A run killed between the two leaves a
checkpoint one round ahead of the file, or (killed while writing) a torn last line; a resumed
run reconciles the file with its checkpoint before its first round: lines of rounds after the
checkpoint's are dropped, rounds the file lacks are written from the checkpoint's history, and
torn lines are removed, so the file holds each completed round exactly once, in order.
Readers (``report``, ``status``) skip a last line that is not complete yet.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from pydantic import ValidationError

from aumai_fedtrain.inputs import describe_validation_error
from aumai_fedtrain.models import RoundRecord

__all__ = ["METRICS_FILE", "MetricsFile", "MetricsFileError", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
"""The metrics file's name in a checkpoint directory."""


class MetricsFileError(ValueError):
    """A metrics file that cannot be read, written or continued."""


def read_metrics(path: str | Path) -> list[RoundRecord]:
    """The complete lines of a metrics file, in file order (a torn last line is skipped).

    Raises :class:`MetricsFileError` naming the file and line for a line that is not a
    round record, and when the file cannot be read.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MetricsFileError(
            f"cannot read metrics file {str(path)!r}: {exc.strerror or exc}"
        ) from None
    return _parse(path, data)


def _parse(path: Path, data: bytes) -> list[RoundRecord]:
    records = []
    lines = data.split(b"\n")
    for number, line in enumerate(lines[:-1], start=1):  # the last piece has no newline yet
        if not line.strip():
            continue
        try:
            records.append(RoundRecord.model_validate_json(line))
        except ValidationError as exc:
            raise MetricsFileError(
                f"metrics file {str(path)!r}, line {number}: not a round record "
                f"({describe_validation_error(exc)})"
            ) from None
    return records


def _reconciled(
    found: Sequence[RoundRecord], completed: int, history: Iterable[RoundRecord]
) -> list[RoundRecord]:
    """One record per round 1..``completed``: the file's where it has one, else history's."""
    by_round = {record.round_id: record for record in history if record.round_id <= completed}
    by_round.update((record.round_id, record) for record in found if record.round_id <= completed)
    return [by_round[round_id] for round_id in sorted(by_round)]


class MetricsFile:
    """An open metrics file that a run appends its rounds to (locked while open).

    Parameters
    ----------
    path
        The file (created when missing).
    completed
        The round the run starts after (0 for a new run, the checkpoint's round on resume).
    history
        The checkpoint's history, written for completed rounds the file lacks.

    A new run (``completed == 0``) refuses a file that already holds rounds, so that the
    metrics of another run are never mixed in or lost.
    """

    def __init__(
        self, path: str | Path, completed: int = 0, history: Sequence[RoundRecord] = ()
    ) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file: IO[bytes] = open(self.path, "ab+")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise MetricsFileError(
                f"cannot open metrics file {str(self.path)!r}: {exc.strerror or exc}"
            ) from None
        try:
            self._lock()
            self._reconcile(completed, history)
        except BaseException:
            self._file.close()
            raise

    def _lock(self) -> None:
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise MetricsFileError(
                f"metrics file {str(self.path)!r} is being written by another run"
            ) from None

    def _reconcile(self, completed: int, history: Sequence[RoundRecord]) -> None:
        self._file.seek(0)
        data = self._file.read()
        found = _parse(self.path, data)
        if completed == 0 and found:
            raise MetricsFileError(
                f"metrics file {str(self.path)!r} already holds {len(found)} rounds of another "
                "run; remove it or write the metrics elsewhere"
            )
        wanted = _reconciled(found, completed, history)
        text = b"".join(_line(record) for record in wanted)
        if text != data:
            self._file.seek(0)
            self._file.truncate()
            self._file.write(text)
            self._file.flush()
            os.fsync(self._file.fileno())

    def append(self, record: RoundRecord) -> None:
        """Write one round's line (flushed, so that readers see it at once)."""
        self._file.write(_line(record))
        self._file.flush()

    def close(self) -> None:
        """Release the file."""
        with contextlib.suppress(OSError):
            self._file.close()

    def __enter__(self) -> MetricsFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _line(record: RoundRecord) -> bytes:
    return record.model_dump_json().encode("utf-8") + b"\n"
