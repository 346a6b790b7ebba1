"""Update providers: where the coordinator's updates come from."""

from aumai_fedtrain.providers.base import Arrivals, RoundStats, UpdateProvider
from aumai_fedtrain.providers.in_process import InProcessProvider, NodeProgress

__all__ = ["Arrivals", "InProcessProvider", "NodeProgress", "RoundStats", "UpdateProvider"]
