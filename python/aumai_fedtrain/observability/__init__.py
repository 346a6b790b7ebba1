"""Seeing a run: its metrics file, experiment trackers, reports, status and live metrics.

The metrics file needs nothing beyond the core; the trackers (``tensorboard``, ``mlflow``
extras), the report (``report`` extra) and the Prometheus exporter (``prometheus`` extra)
import their libraries on first use and say which extra to install when one is missing.
"""

from aumai_fedtrain.observability.metrics_file import (
    METRICS_FILE,
    MetricsFile,
    MetricsFileError,
    read_metrics,
)

__all__ = ["METRICS_FILE", "MetricsFile", "MetricsFileError", "read_metrics"]
