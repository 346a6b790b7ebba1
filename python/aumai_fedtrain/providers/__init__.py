"""Update providers: where the coordinator's updates come from."""

from aumai_fedtrain.providers.base import RoundStats, UpdateProvider
from aumai_fedtrain.providers.in_process import InProcessProvider, NodeProgress

__all__ = ["InProcessProvider", "NodeProgress", "RoundStats", "UpdateProvider"]
