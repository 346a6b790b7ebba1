"""The coordinator's list of real nodes: a JSON file of ids, addresses, keys and tokens.

``nodes.json`` is a JSON list with one object per node::

    [
      {"node_id": "node-a", "address": "10.0.0.1:8750", "key_file": "keys/node-a.key",
       "token_file": "tokens/node-a.token", "max_samples": 640},
      {"node_id": "node-b", "address": "https://node-b.example.org:8750",
       "key": "<the key itself>", "capabilities": {"gpu": false}}
    ]

``address`` is ``host:port`` (the scheme is chosen by the coordinator: https when it has a CA
file, else http) or a base URL with the scheme ``http`` or ``https`` and an optional path; a
port is from 1 to 65535. Each node has exactly one of
``key`` (the shared secret itself) or ``key_file`` (a file holding it, relative to the nodes
file's folder), and at most one of ``token`` or ``token_file``: the bearer token the
coordinator sends to this node only (without one it sends its ``--token-file``), so that one
leaked token does not open every node. ``max_samples`` is the most samples the node may claim
in a round (default ``local_steps * batch_size``); ``capabilities`` is optional metadata.

The file is strict, like config files: ``"max_samples": "320"`` is an error, not a coercion,
and so is an unknown key or an address that no node can have.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, field_validator

from aumai_fedtrain.inputs import describe_validation_error, read_text_file
from aumai_fedtrain.models import FederatedNode
from aumai_fedtrain.network.auth import (
    SecretError,
    load_secret,
    secret_from_text,
    warn_if_readable,
)

__all__ = [
    "NodeEntry",
    "NodesFile",
    "NodesFileError",
    "check_address",
    "load_nodes_file",
    "read_nodes_file",
]

_SCHEMES = ("http", "https")


class NodesFileError(ValueError):
    """A nodes file that cannot be used; the message names the file and the entry."""


def check_address(address: str) -> str:
    """Return a node's ``address`` (``host:port`` or an http/https base URL), else raise
    ``ValueError`` saying what is wrong with it."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    if "://" in address and parts.scheme.lower() not in _SCHEMES:
        raise ValueError(
            f"{address!r} has the scheme {parts.scheme!r}; use http://, https:// or host:port"
        )
    try:
        port = parts.port
    except ValueError:  # not a number, or beyond 65535
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"{address!r} has no valid port (1 to 65535)")
    if not parts.hostname:
        raise ValueError(f"{address!r} names no host")
    return address


class NodeEntry(BaseModel):
    """One node of a nodes file (strict: no coercion of strings to numbers)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    node_id: Annotated[str, Field(min_length=1)]
    address: Annotated[str, Field(min_length=1)]
    key: str | None = None
    key_file: str | None = None
    token: str | None = None
    token_file: str | None = None
    max_samples: Annotated[int, Field(ge=0)] | None = None
    capabilities: dict[str, Any] = Field(default_factory=dict)

    @field_validator("address")
    @classmethod
    def _valid_address(cls, address: str) -> str:
        return check_address(address)


class _NodesFile(RootModel[list[dict[str, Any]]]):
    pass


@dataclass(frozen=True)
class NodesFile:
    """What a nodes file holds: the nodes (in file order), their keys and per-node tokens."""

    nodes: list[FederatedNode]
    keys: dict[str, bytes]
    tokens: dict[str, bytes]
    """Node id -> its own bearer token, for the nodes that have one."""


def read_nodes_file(path: str | Path) -> NodesFile:
    """Read a nodes file: its nodes, keys and per-node tokens.

    Raises :class:`NodesFileError` with one line naming the file, the entry and the problem.
    """
    path = Path(path)
    where = f"nodes file {str(path)!r}"
    text = read_text_file(path, "nodes", NodesFileError)
    try:
        raw = _NodesFile.model_validate_json(text).root
    except ValidationError as exc:
        raise NodesFileError(f"invalid {where}: {describe_validation_error(exc)}") from None
    entries: list[NodeEntry] = []
    for index, item in enumerate(raw):
        try:
            entries.append(NodeEntry.model_validate(item))
        except ValidationError as exc:
            detail = describe_validation_error(exc)
            raise NodesFileError(f"invalid {where}: entry {index}: {detail}") from None
    if not entries:
        raise NodesFileError(f"invalid {where}: it lists no node")
    if any(entry.key is not None or entry.token is not None for entry in entries):
        warn_if_readable(path, f"{where} (it holds secrets)")
    nodes: list[FederatedNode] = []
    keys: dict[str, bytes] = {}
    tokens: dict[str, bytes] = {}
    for index, entry in enumerate(entries):
        label = f"invalid {where}: entry {index} ({entry.node_id!r})"
        if entry.node_id in keys:
            raise NodesFileError(f"{label}: duplicate node id")
        inline = f"{where}, entry {index} ({entry.node_id!r}),"
        try:
            keys[entry.node_id] = _secret(entry.key, entry.key_file, path.parent, "key", inline)
            if entry.token is not None or entry.token_file is not None:
                tokens[entry.node_id] = _secret(
                    entry.token, entry.token_file, path.parent, "token", inline
                )
        except SecretError as exc:
            raise NodesFileError(f"{label}: {exc}") from None
        nodes.append(
            FederatedNode(
                node_id=entry.node_id,
                address=entry.address,
                capabilities=entry.capabilities,
                max_samples=entry.max_samples,
            )
        )
    return NodesFile(nodes=nodes, keys=keys, tokens=tokens)


def load_nodes_file(path: str | Path) -> tuple[list[FederatedNode], dict[str, bytes]]:
    """Read a nodes file: the nodes (in file order) and each node's signing key.

    :func:`read_nodes_file` also gives the per-node tokens. Raises :class:`NodesFileError`.
    """
    nodes_file = read_nodes_file(path)
    return nodes_file.nodes, nodes_file.keys


def _secret(inline: str | None, file: str | None, folder: Path, what: str, where: str) -> bytes:
    """The entry's ``what`` (key or token): inline or from its file, exactly one of them."""
    if (inline is None) == (file is None):
        raise SecretError(f"give exactly one of '{what}' and '{what}_file'")
    if inline is not None:
        return secret_from_text(inline, what, token=what == "token", source=f"{where} {what}")
    assert file is not None
    return load_secret(folder / file, what)
