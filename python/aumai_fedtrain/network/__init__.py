"""Real nodes over the network: the node server, ``HttpUpdateProvider``, wire formats and auth.

The node (:mod:`~aumai_fedtrain.network.server`, Starlette + uvicorn) and the provider
(:mod:`~aumai_fedtrain.network.provider`, httpx) need the ``http`` extra
(``pip install "aumai-fedtrain[http]"``); they are imported on first use, so the wire formats,
authentication and nodes files work without it.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType
from typing import Any

from aumai_fedtrain.network.auth import SecretError, load_secret, sign_update, verify_update
from aumai_fedtrain.network.nodes_file import (
    NodesFile,
    NodesFileError,
    load_nodes_file,
    read_nodes_file,
)
from aumai_fedtrain.network.wire import JSON, SAFETENSORS, TrainRequest, WireError

__all__ = [
    "JSON",
    "SAFETENSORS",
    "HttpUpdateProvider",
    "LocalNode",
    "NodeSettings",
    "NodesFile",
    "NodesFileError",
    "QuorumError",
    "SecretError",
    "TrainRequest",
    "WireError",
    "create_app",
    "free_port",
    "load_nodes_file",
    "load_secret",
    "read_nodes_file",
    "sign_update",
    "verify_update",
]

HTTP_EXTRA = "pip install 'aumai-fedtrain[http]'"
_NEEDS_HTTP_EXTRA = {
    "HttpUpdateProvider": "provider",
    "QuorumError": "provider",
    "NodeSettings": "server",
    "create_app": "server",
    "LocalNode": "local",
    "free_port": "local",
}


def http_module(name: str) -> ModuleType:
    """Import ``aumai_fedtrain.network.<name>``; ``ImportError`` naming the extra if missing."""
    try:
        return import_module(f"aumai_fedtrain.network.{name}")
    except ModuleNotFoundError as exc:
        raise ImportError(
            f"{exc.name} is not installed; the network features need the http extra: {HTTP_EXTRA}"
        ) from exc


def __getattr__(name: str) -> Any:
    if name not in _NEEDS_HTTP_EXTRA:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(http_module(_NEEDS_HTTP_EXTRA[name]), name)
