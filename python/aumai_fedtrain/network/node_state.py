"""A node's trainer state on disk, for ``aumai-fedtrain node --state-dir DIR``.

After every round it trains, the node writes ``DIR/node-state.safetensors`` (replaced
atomically: a node killed at any moment leaves the previous or the new file): its id, the last
round it trained, its trainer's state (:meth:`~aumai_fedtrain.trainer.NodeTrainer.state_dict`:
the inner optimizer's moments, the position in the data) before and after that round. A node
started on the same directory loads it, so it goes on where it stopped: the next round
continues from the state after, and the last round asked again (a coordinator that did not
get the answer) is trained again from the state before. Tensors keep their dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aumai_fedtrain.files import safetensors_header, write_atomically
from aumai_fedtrain.models import TensorMap

__all__ = ["STATE_FILE", "NodeState", "NodeStateError", "load_node_state", "save_node_state"]

STATE_FILE = "node-state.safetensors"
_FORMAT = "aumai-fedtrain/node-state"
_VERSION = "1"
_GROUPS = ("before", "after")


class NodeStateError(ValueError):
    """A state directory that cannot be used: unreadable, of another format or node."""


@dataclass(frozen=True)
class NodeState:
    """What a node keeps across restarts."""

    last_round: int
    """The last round the node trained."""
    before: TensorMap
    """The trainer's state before that round (to train it again when asked again)."""
    after: TensorMap
    """The trainer's state after it (where the next round starts)."""


def save_node_state(directory: str | Path, node_id: str, state: NodeState) -> Path:
    """Write ``state`` of ``node_id`` to ``directory`` (created if need be) atomically.

    Returns the file's path. Raises ``OSError`` when it cannot be written (the previous file
    is then kept).
    """
    from safetensors.numpy import save

    tensors = {
        f"{group}/{name}": np.asarray(value, order="C")
        for group in _GROUPS
        for name, value in getattr(state, group).items()
    }
    metadata = {
        "format": _FORMAT,
        "version": _VERSION,
        "node_id": node_id,
        "last_round": str(state.last_round),
    }
    Path(directory).mkdir(parents=True, exist_ok=True)
    return write_atomically(Path(directory) / STATE_FILE, save(tensors, metadata))


def load_node_state(directory: str | Path, node_id: str) -> NodeState | None:
    """The state ``node_id`` saved in ``directory``; None when there is none yet.

    Raises :class:`NodeStateError` (one line) for a file that cannot be read, of another
    format, or of another node.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(directory) / STATE_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise NodeStateError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        metadata = safetensors_header(data).get("__metadata__") or {}
        tensors = load(data)
    except (SafetensorError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise NodeStateError(f"{path} is not a readable node state ({reason})") from None
    if metadata.get("format") != _FORMAT or metadata.get("version") != _VERSION:
        raise NodeStateError(
            f"{path} is not a node state this version of aumai-fedtrain reads (format "
            f"{metadata.get('format')!r}, version {metadata.get('version')!r})"
        )
    if metadata.get("node_id") != node_id:
        raise NodeStateError(
            f"{path} holds the state of node {metadata.get('node_id')!r}, not of {node_id!r}: "
            "give every node its own --state-dir"
        )
    round_text = metadata.get("last_round", "")
    groups: dict[str, TensorMap] = {group: {} for group in _GROUPS}
    for name, value in tensors.items():
        group, _, key = name.partition("/")
        if group not in groups or not key:
            raise NodeStateError(f"{path} is corrupt: unexpected tensor {name!r}")
        groups[group][key] = value
    if not round_text.isdigit():
        raise NodeStateError(f"{path} is corrupt: bad last_round {round_text!r}")
    return NodeState(int(round_text), groups["before"], groups["after"])
