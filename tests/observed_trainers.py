"""Trainers for the observability tests, loaded by ``run --trainer tests.observed_trainers:...``.

``flaky`` is the built-in trainer, except that node-001 reports a NaN loss in round 2 (so it is
dropped with a reason), and that node-000, in round ``SCRAPE_ROUND``, fetches the URL in the
environment's ``AUMAI_TEST_SCRAPE_URL`` and writes the answer to ``AUMAI_TEST_SCRAPE_FILE``
(the coordinator's live metrics, seen from inside the run).
"""

from __future__ import annotations

import math
import os
import urllib.request
from pathlib import Path

from aumai_fedtrain.models import TensorMap, TrainingConfig
from aumai_fedtrain.simulation import SimulationTrainer, builtin_evaluator

FAILING_NODE, FAILING_ROUND = "node-001", 2
SCRAPE_ROUND = 3


class FlakyTrainer(SimulationTrainer):
    """The built-in trainer with a NaN loss on node-001 in round 2 (and a scrape, see above)."""

    def train(self, round_id: int, parameters: TensorMap) -> tuple[TensorMap, float, int]:
        delta, loss, samples = super().train(round_id, parameters)
        url = os.environ.get("AUMAI_TEST_SCRAPE_URL")
        if url and round_id == SCRAPE_ROUND and self.node_id == "node-000":
            with urllib.request.urlopen(url, timeout=30) as answer:
                Path(os.environ["AUMAI_TEST_SCRAPE_FILE"]).write_bytes(answer.read())
        if (self.node_id, round_id) == (FAILING_NODE, FAILING_ROUND):
            return delta, math.nan, samples
        return delta, loss, samples


def flaky(node_id: str, config: TrainingConfig) -> FlakyTrainer:
    """Trainer factory of :class:`FlakyTrainer`."""
    return FlakyTrainer(node_id, config)


def evaluate(parameters: TensorMap, config: TrainingConfig) -> tuple[float, float]:
    """The built-in evaluation (for ``--evaluator``)."""
    return builtin_evaluator(config)(parameters)
