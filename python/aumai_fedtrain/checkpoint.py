"""Checkpoints of a run: one safetensors file, replaced atomically after every round.

Tensors (global parameters, outer momentum, last averaged update, the provider's state such as
the nodes' inner optimizers) are stored as float64
safetensors entries; everything else (config, node ids, round, credits, history, elapsed time)
is JSON in the file's metadata, together with a SHA-256 over the tensors so that corruption is
detected. Writing goes to a temporary file that is fsynced and renamed over the old checkpoint,
so a run killed at any moment leaves either the previous or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aumai_fedtrain.models import GlobalState, RoundRecord, TensorMap, TrainingConfig

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT_NAME = "aumai-fedtrain/checkpoint"
FORMAT_VERSION = "1"
_TENSOR_GROUPS = ("parameters", "momentum", "global_weights")
_PROVIDER_GROUP = "provider"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, of another format, or of another run."""


class Checkpoint(BaseModel):
    """Everything needed to resume a run after its last completed round."""

    model_config = ConfigDict(extra="forbid")

    config: TrainingConfig
    node_ids: list[str]
    state: GlobalState
    credits: dict[str, int]
    history: list[RoundRecord]
    elapsed: float
    provider_state: TensorMap = Field(default_factory=dict)
    """What the provider keeps across rounds (:meth:`UpdateProvider.state_dict`)."""

    def check_compatible(self, config: TrainingConfig, node_ids: list[str]) -> None:
        """Raise :class:`CheckpointError` unless this checkpoint belongs to the same run.

        Only ``global_rounds`` may differ (to extend or shorten a run).
        """
        saved = self.config.model_dump(mode="json", exclude={"global_rounds"})
        wanted = config.model_dump(mode="json", exclude={"global_rounds"})
        differing = sorted(
            key for key in saved.keys() | wanted.keys() if saved.get(key) != wanted.get(key)
        )
        if differing:
            raise CheckpointError(
                "the checkpoint was written by a run with a different configuration "
                f"(differs in: {', '.join(differing)})"
            )
        if self.node_ids != node_ids:
            raise CheckpointError("the checkpoint was written by a run with different nodes")


def _tensor_digest(tensors: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.asarray(tensors[name], dtype="<f8", order="C")
        digest.update(json.dumps([name, list(array.shape)]).encode("utf-8"))
        digest.update(array.tobytes())
    return digest.hexdigest()


def _flatten(checkpoint: Checkpoint) -> dict[str, np.ndarray]:
    groups = {group: getattr(checkpoint.state, group) or {} for group in _TENSOR_GROUPS}
    groups[_PROVIDER_GROUP] = checkpoint.provider_state
    return {
        f"{group}/{key}": np.asarray(value, dtype="<f8", order="C")
        for group, tensors in groups.items()
        for key, value in tensors.items()
    }


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    """Atomically write ``checkpoint`` to ``directory`` and return the file's path."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = _flatten(checkpoint)
    run = checkpoint.model_dump(mode="json", exclude={"state", "provider_state"})
    run["state"] = checkpoint.state.model_dump(mode="json", exclude=set(_TENSOR_GROUPS))
    # Key order of every tensor group (safetensors stores names sorted).
    run["tensor_keys"] = {
        group: [name.split("/", 1)[1] for name in tensors if name.startswith(f"{group}/")]
        for group in (*_TENSOR_GROUPS, _PROVIDER_GROUP)
    }
    run["state"]["has"] = [g for g in _TENSOR_GROUPS if getattr(checkpoint.state, g) is not None]
    metadata = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "run": json.dumps(run),
        "tensors_sha256": _tensor_digest(tensors),
    }
    target = directory / CHECKPOINT_FILE
    for stale in directory.glob(f".{CHECKPOINT_FILE}.*.tmp"):  # left by a run killed mid-write
        stale.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{CHECKPOINT_FILE}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp_name, metadata=metadata)  # streamed to disk, no copy in memory
        with open(tmp_name, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def _read(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint ({exc})") from None
    return metadata, tensors


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """Read the checkpoint in ``directory``; None when there is none yet.

    Raises :class:`CheckpointError` for a corrupt file or one of another format.
    """
    path = directory / CHECKPOINT_FILE
    if not path.exists():
        return None
    metadata, tensors = _read(path)
    if metadata.get("format") != FORMAT_NAME or metadata.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is not an aumai-fedtrain checkpoint (format "
            f"{metadata.get('format')!r}, version {metadata.get('version')!r})"
        )
    if _tensor_digest(tensors) != metadata.get("tensors_sha256"):
        raise CheckpointError(f"{path} is corrupt: its tensors do not match their SHA-256")
    try:
        run: dict[str, Any] = json.loads(metadata["run"])
        state_fields = run["state"]
        order = run.pop("tensor_keys")
        for group in state_fields.pop("has"):
            state_fields[group] = _group(tensors, group, order[group])
        run["provider_state"] = _group(tensors, _PROVIDER_GROUP, order[_PROVIDER_GROUP])
        return Checkpoint.model_validate(run)
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError, ValidationError) as exc:
        raise CheckpointError(f"{path} is corrupt: bad run metadata ({exc})") from None


def _group(tensors: dict[str, np.ndarray], group: str, keys: list[str]) -> TensorMap:
    return {key: tensors[f"{group}/{key}"].astype(np.float64, copy=False) for key in keys}
