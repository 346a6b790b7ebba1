"""Update providers: where the coordinator's updates come from."""

from aumai_fedtrain.providers.base import UpdateProvider

__all__ = ["UpdateProvider"]
