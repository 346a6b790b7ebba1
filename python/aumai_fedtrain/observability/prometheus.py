"""Live metrics in the Prometheus text format (prometheus-client, an optional extra).

:class:`NodeMetrics` counts what a node does (its ``/metrics`` endpoint renders it);
:class:`CoordinatorExporter` serves the coordinator's figures on a port of its own
(``run --prometheus-port``), updated after every round. Each has its own registry, so several
live side by side in one process.
"""

from __future__ import annotations

from typing import Any

from aumai_fedtrain.models import RoundRecord
from aumai_fedtrain.observability.records import DROP_KINDS, drop_kind
from aumai_fedtrain.observability.trackers import require_extra

__all__ = ["NODE_OUTCOMES", "CoordinatorExporter", "NodeMetrics"]

NODE_OUTCOMES = ("trained", "unauthorized", "bad_request", "conflict", "failed", "busy")
"""Outcomes of a node's ``POST /train`` requests, as counted by :class:`NodeMetrics`."""

_TRAINING_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


def _client() -> Any:
    return require_extra("prometheus_client", "prometheus")


class NodeMetrics:
    """A node's counters: requests by outcome, training time, bytes in and out."""

    def __init__(self) -> None:
        client = _client()
        self._client = client
        self.registry = client.CollectorRegistry()
        self.requests = client.Counter(
            "fedtrain_node_requests",
            "POST /train requests by outcome (busy: a connection refused because every "
            "connection was serving a request)",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in NODE_OUTCOMES:
            self.requests.labels(outcome)
        self.training_seconds = client.Histogram(
            "fedtrain_node_training_seconds",
            "Seconds the trainer took per round",
            buckets=_TRAINING_BUCKETS,
            registry=self.registry,
        )
        self.received_bytes = client.Counter(
            "fedtrain_node_received_bytes",
            "Bytes of request bodies received on POST /train",
            registry=self.registry,
        )
        self.sent_bytes = client.Counter(
            "fedtrain_node_sent_bytes",
            "Bytes of update bodies sent in answer to POST /train",
            registry=self.registry,
        )

    def request(self, outcome: str) -> None:
        """Count one request with ``outcome`` (one of :data:`NODE_OUTCOMES`)."""
        self.requests.labels(outcome).inc()

    def busy(self) -> None:
        """Count one connection refused because the node had no connection free."""
        self.request("busy")

    def render(self) -> tuple[bytes, str]:
        """The metrics in the Prometheus text format, and its content type."""
        return self._client.generate_latest(self.registry), self._client.CONTENT_TYPE_LATEST


class CoordinatorExporter:
    """Serves the coordinator's figures on ``http://host:port/metrics``; a round callback.

    Gauges of the last round (round, participants, losses, accuracy, node times), counters over
    the run (drops by reason kind, bytes each way, rounds). Call :meth:`close` at the end.
    """

    def __init__(
        self, port: int, host: str = "127.0.0.1", *, total_rounds: int, num_nodes: int
    ) -> None:
        client = _client()
        self.registry = registry = client.CollectorRegistry()

        def gauge(name: str, text: str, labels: tuple[str, ...] = ()) -> Any:
            return client.Gauge(name, text, labels, registry=registry)

        def counter(name: str, text: str, labels: tuple[str, ...] = ()) -> Any:
            return client.Counter(name, text, labels, registry=registry)

        gauge("fedtrain_rounds_planned", "Rounds the run is configured for").set(total_rounds)
        gauge("fedtrain_nodes", "Nodes of the run").set(num_nodes)
        self.round = gauge("fedtrain_round", "Last completed round")
        self.participants = gauge("fedtrain_participants", "Nodes whose update counted")
        self.train_loss = gauge("fedtrain_train_loss", "Mean training loss of the last round")
        self.eval_loss = gauge("fedtrain_eval_loss", "Eval loss of the global model")
        self.eval_accuracy = gauge("fedtrain_eval_accuracy", "Eval accuracy of the global model")
        self.round_seconds = gauge("fedtrain_round_seconds", "Seconds the last round took")
        self.node_seconds = gauge(
            "fedtrain_node_seconds", "Node times of the last round", ("quantile",)
        )
        self.drops = counter("fedtrain_dropped_nodes", "Nodes dropped from a round", ("reason",))
        for kind in DROP_KINDS:
            self.drops.labels(kind)
        self.bytes_to = counter("fedtrain_bytes_to_nodes", "Bytes sent to the nodes")
        self.bytes_from = counter("fedtrain_bytes_from_nodes", "Bytes received from the nodes")
        self.rounds = counter("fedtrain_rounds_completed", "Rounds completed by this process")
        self._server, self._thread = client.start_http_server(port, addr=host, registry=registry)

    @property
    def port(self) -> int:
        """The port it serves on."""
        return int(self._server.server_address[1])

    def __call__(self, record: RoundRecord) -> None:
        self.round.set(record.round_id)
        self.participants.set(record.num_participants)
        self.train_loss.set(record.avg_loss)
        if record.eval_loss is not None:
            self.eval_loss.set(record.eval_loss)
        if record.eval_accuracy is not None:
            self.eval_accuracy.set(record.eval_accuracy)
        self.round_seconds.set(record.duration_seconds)
        if record.node_times is not None:
            for quantile, value in (
                ("0.5", record.node_times.p50),
                ("0.9", record.node_times.p90),
                ("1", record.node_times.max),
            ):
                self.node_seconds.labels(quantile).set(value)
        for reason in record.dropped.values():
            self.drops.labels(drop_kind(reason)).inc()
        if record.bytes_to_nodes is not None:
            self.bytes_to.inc(record.bytes_to_nodes)
        if record.bytes_from_nodes is not None:
            self.bytes_from.inc(record.bytes_from_nodes)
        self.rounds.inc()

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
