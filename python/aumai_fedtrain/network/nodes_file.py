"""The coordinator's list of real nodes: a JSON file of ids, addresses and keys.

``nodes.json`` is a JSON list with one object per node::

    [
      {"node_id": "node-a", "address": "10.0.0.1:8750", "key_file": "keys/node-a.key"},
      {"node_id": "node-b", "address": "https://node-b.example.org:8750",
       "key": "<the key itself>", "capabilities": {"gpu": false}}
    ]

``address`` is ``host:port`` (the scheme is chosen by the coordinator: https when it has a CA
file, else http) or a base URL with scheme and optional path. Each node has exactly one of
``key`` (the shared secret itself) or ``key_file`` (a file holding it, relative to the nodes
file's folder); ``capabilities`` is optional metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError

from aumai_fedtrain.inputs import describe_validation_error, read_text_file
from aumai_fedtrain.models import FederatedNode
from aumai_fedtrain.network.auth import (
    SecretError,
    load_secret,
    secret_from_text,
)

__all__ = ["NodeEntry", "NodesFileError", "load_nodes_file"]


class NodesFileError(ValueError):
    """A nodes file that cannot be used; the message names the file and the entry."""


class NodeEntry(BaseModel):
    """One node of a nodes file."""

    model_config = ConfigDict(extra="forbid")

    node_id: Annotated[str, Field(min_length=1)]
    address: Annotated[str, Field(min_length=1)]
    key: str | None = None
    key_file: str | None = None
    capabilities: dict[str, Any] = Field(default_factory=dict)


class _NodesFile(RootModel[list[NodeEntry]]):
    pass


def load_nodes_file(path: str | Path) -> tuple[list[FederatedNode], dict[str, bytes]]:
    """Read a nodes file: the nodes (in file order) and each node's signing key.

    Raises :class:`NodesFileError` with one line naming the file, the entry and the problem.
    """
    path = Path(path)
    where = f"nodes file {str(path)!r}"
    text = read_text_file(path, "nodes", NodesFileError)
    try:
        entries = _NodesFile.model_validate_json(text).root
    except ValidationError as exc:
        raise NodesFileError(f"invalid {where}: {describe_validation_error(exc)}") from None
    if not entries:
        raise NodesFileError(f"invalid {where}: it lists no node")
    nodes: list[FederatedNode] = []
    keys: dict[str, bytes] = {}
    for index, entry in enumerate(entries):
        label = f"invalid {where}: entry {index} ({entry.node_id!r})"
        if entry.node_id in keys:
            raise NodesFileError(f"{label}: duplicate node id")
        try:
            keys[entry.node_id] = _entry_key(entry, path.parent)
        except SecretError as exc:
            raise NodesFileError(f"{label}: {exc}") from None
        nodes.append(
            FederatedNode(
                node_id=entry.node_id, address=entry.address, capabilities=entry.capabilities
            )
        )
    return nodes, keys


def _entry_key(entry: NodeEntry, folder: Path) -> bytes:
    if (entry.key is None) == (entry.key_file is None):
        raise SecretError("give exactly one of 'key' and 'key_file'")
    if entry.key is not None:
        return secret_from_text(entry.key, "key")
    assert entry.key_file is not None
    return load_secret(folder / entry.key_file, "key")
