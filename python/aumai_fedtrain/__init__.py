"""aumai-fedtrain: federated, low-communication (DiLoCo) training.

Nodes train locally for ``local_steps`` inner steps and send a pseudo-gradient; the
:class:`DiLoCoCoordinator` verifies, averages and applies it with an outer Nesterov step, credits
the nodes and checkpoints the run. The hot paths (canonical hashing, per-key averaging) run in a
Rust extension with a pure-Python fallback (see :mod:`aumai_fedtrain.backend`).
"""

from importlib.metadata import PackageNotFoundError, version

from aumai_fedtrain.aggregation import GradientAverager, average_updates
from aumai_fedtrain.checkpoint import CheckpointError
from aumai_fedtrain.coordinator import DiLoCoCoordinator
from aumai_fedtrain.credits import CreditTracker
from aumai_fedtrain.models import (
    AggregationConfig,
    CompressionConfig,
    FederatedNode,
    GlobalState,
    LocalUpdate,
    RoundRecord,
    SimulationConfig,
    TrainingConfig,
    TrainingResult,
)
from aumai_fedtrain.providers import UpdateProvider
from aumai_fedtrain.verification import HashVerifier

try:
    __version__ = version("aumai-fedtrain")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AggregationConfig",
    "CheckpointError",
    "CompressionConfig",
    "CreditTracker",
    "DiLoCoCoordinator",
    "FederatedNode",
    "GlobalState",
    "GradientAverager",
    "HashVerifier",
    "LocalUpdate",
    "RoundRecord",
    "SimulationConfig",
    "TrainingConfig",
    "TrainingResult",
    "UpdateProvider",
    "__version__",
    "average_updates",
]
