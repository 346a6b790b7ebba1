"""Credit accounting: how many samples each node processed for the run."""

from __future__ import annotations


class CreditTracker:
    """Counts the samples each node contributed, across rounds."""

    def __init__(self, credits: dict[str, int] | None = None) -> None:
        self._credits: dict[str, int] = {}
        for node_id, samples in (credits or {}).items():
            self.record(node_id, samples)

    def record(self, node_id: str, samples: int) -> None:
        """Credit ``node_id`` with ``samples`` more samples."""
        if samples < 0:
            raise ValueError(f"cannot credit {node_id!r} with a negative sample count ({samples})")
        self._credits[node_id] = self._credits.get(node_id, 0) + int(samples)

    def get_credits(self, node_id: str) -> int:
        """Samples credited to ``node_id`` so far (0 for a node never credited)."""
        return self._credits.get(node_id, 0)

    def all_credits(self) -> dict[str, int]:
        """A copy of every node's credited samples."""
        return dict(self._credits)

    def total(self) -> int:
        """Samples credited to all nodes."""
        return sum(self._credits.values())

    def reset(self) -> None:
        """Forget all credits."""
        self._credits.clear()
