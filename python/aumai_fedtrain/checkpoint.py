"""Checkpoints of a run: one safetensors file, replaced atomically after every round.

Tensors (global parameters, outer momentum, last averaged update, the provider's state such as
the nodes' inner optimizers) are stored as safetensors entries in their own dtype (``F64``,
``F32`` or ``F16``; other numbers as ``F64``), so a run resumes bit for bit; everything else
(config, node ids, round, credits, history, elapsed time) is JSON in the file's metadata. A
SHA-256 over the metadata and the tensors detects any corruption of either. Writing goes to a
temporary file that is fsynced and renamed over the old checkpoint, so a run killed at any
moment leaves either the previous or the new checkpoint, never a torn one.

One run writes to a directory at a time: the coordinator holds :func:`checkpoint_lock` for the
whole run, and calls :func:`check_writable` before the first round trains.

Format versions: "2" (this one) names per-node provider tensors ``node/<node_id>/<tensor>``
and its digest covers the metadata. Version "1" (aumai-fedtrain 0.1) still loads: its digest
covers only the tensors, so its metadata is trusted as it is, and its provider tensors, named
``node/<position in node_ids>/<tensor>``, are renamed to the node ids.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aumai_fedtrain.files import write_buffers
from aumai_fedtrain.inputs import describe_validation_error
from aumai_fedtrain.models import (
    GlobalState,
    RoundRecord,
    TensorMap,
    TrainingConfig,
    as_stored,
    stored_name,
)

CHECKPOINT_FILE = "checkpoint.safetensors"
LOCK_FILE = "checkpoint.lock"
FORMAT_NAME = "aumai-fedtrain/checkpoint"
FORMAT_VERSION = "2"
_LEGACY_VERSION = "1"
_TENSOR_GROUPS = ("parameters", "momentum", "global_weights")
_PROVIDER_GROUP = "provider"
_OPERATIONAL_FIELDS = frozenset({"global_rounds", "num_nodes", "max_loss", "max_abs_update"})
"""Config fields a resumed run may change: its length, its membership and screening bounds."""


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

    def check_compatible(self, config: TrainingConfig) -> None:
        """Raise :class:`CheckpointError` unless ``config`` may continue this checkpoint's run.

        The nodes may differ (membership changes across a resume), and so may the config's
        ``global_rounds``, ``num_nodes``, ``max_loss`` and ``max_abs_update``; every other field
        must match. ``global_rounds`` may not be below the rounds already completed.
        """
        saved = self.config.model_dump(mode="json", exclude=set(_OPERATIONAL_FIELDS))
        wanted = config.model_dump(mode="json", exclude=set(_OPERATIONAL_FIELDS))
        differing = sorted(
            key for key in saved.keys() | wanted.keys() if saved.get(key) != wanted.get(key)
        )
        if differing:
            raise CheckpointError(
                "the checkpoint was written by a run with a different configuration "
                f"(differs in: {', '.join(differing)})"
            )
        done = self.state.round_id
        if config.global_rounds < done:
            raise CheckpointError(
                f"the checkpoint already completed {done} rounds; --rounds "
                f"{config.global_rounds} is below that: pass --rounds {done} or more, "
                "or another --checkpoint-dir"
            )


def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _ensure_directory(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {str(directory)!r} is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(
            f"cannot create checkpoint directory {str(directory)!r}: {_os_reason(exc)}"
        ) from None


def check_writable(directory: str | Path) -> None:
    """Create ``directory`` if needed and prove that files can be created in it.

    Raises :class:`CheckpointError` naming the directory and the operating system's reason.
    Call it before the first round trains, so that an unwritable ``--checkpoint-dir`` fails at
    once instead of after a round of work.
    """
    directory = Path(directory)
    _ensure_directory(directory)
    probe = directory / f".write-test.{secrets.token_hex(8)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint directory {str(directory)!r} is not writable: {_os_reason(exc)}"
        ) from None


@contextlib.contextmanager
def checkpoint_lock(directory: str | Path) -> Iterator[None]:
    """Hold the exclusive lock of a checkpoint directory (created if needed) for a run.

    A second holder, in this or another process, gets a :class:`CheckpointError` at once
    naming the pid of the run that holds it. The lock is an ``flock`` on ``checkpoint.lock``
    in the directory, released by the kernel when its process dies, so a killed run never
    blocks the next one; the file is removed on a normal exit.
    """
    directory = Path(directory)
    _ensure_directory(directory)
    path = directory / LOCK_FILE
    fd = _acquire(path, directory)
    with contextlib.suppress(OSError):  # the pid only informs the message of a refused run
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    try:
        yield
    finally:
        _finish_releases()  # the replaced checkpoints' blocks are freed before the run ends
        path.unlink(missing_ok=True)  # while still locked: the next run makes a fresh file
        os.close(fd)


def _acquire(path: Path, directory: Path) -> int:
    """An open, ``flock``-ed descriptor of the lock file that ``path`` names right now."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise CheckpointError(
                f"cannot create the lock file in {str(directory)!r}: {_os_reason(exc)}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise CheckpointError(
                    f"cannot lock checkpoint directory {str(directory)!r}: {_os_reason(exc)}"
                ) from None
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise CheckpointError(
                f"checkpoint directory {str(directory)!r} is in use by another run{pid}: "
                "wait for it to finish or choose another --checkpoint-dir"
            ) from None
        # The previous holder may have removed the file between our open and our flock: then
        # we hold a lock on a file nobody else will open, and must lock the current one.
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        os.close(fd)


def _digest(tensors: dict[str, np.ndarray], run: str | None) -> str:
    """SHA-256 over the format, version and ``run`` metadata (None: version 1, tensors only).

    The tensors are hashed in place (views of their bytes, no copies); ``hashlib`` releases the
    GIL while it hashes them, so this runs beside the write in :func:`save_checkpoint`.
    """
    digest = hashlib.sha256()
    if run is not None:
        digest.update(json.dumps([FORMAT_NAME, FORMAT_VERSION, run]).encode("utf-8"))
    for name in sorted(tensors):
        array = as_stored(tensors[name])
        # A float64 tensor is described as before dtypes were kept (older checkpoints still
        # verify); any other names its dtype, so that the digest covers it.
        described = [name, list(array.shape)]
        if array.dtype.itemsize != 8:
            described.append(stored_name(array.dtype))
        digest.update(json.dumps(described).encode("utf-8"))
        digest.update(array.reshape(-1).data)
    return digest.hexdigest()


def _flatten(checkpoint: Checkpoint) -> dict[str, np.ndarray]:
    groups = {group: getattr(checkpoint.state, group) or {} for group in _TENSOR_GROUPS}
    groups[_PROVIDER_GROUP] = checkpoint.provider_state
    return {
        f"{group}/{key}": as_stored(value)
        for group, tensors in groups.items()
        for key, value in tensors.items()
    }


def save_checkpoint(directory: str | Path, checkpoint: Checkpoint) -> Path:
    """Atomically write ``checkpoint`` to ``directory`` and return the file's path.

    The caller holds :func:`checkpoint_lock` on ``directory`` (this removes temporary files
    left by earlier, killed writers). Raises :class:`CheckpointError` when the file cannot be
    written; the previous checkpoint is then left as it was.
    """
    directory = Path(directory)
    _ensure_directory(directory)
    tensors = _flatten(checkpoint)
    run = checkpoint.model_dump(mode="json", exclude={"state", "provider_state"})
    run["state"] = checkpoint.state.model_dump(mode="json", exclude=set(_TENSOR_GROUPS))
    # Key order of every tensor group (safetensors stores names sorted).
    run["tensor_keys"] = {
        group: [name.split("/", 1)[1] for name in tensors if name.startswith(f"{group}/")]
        for group in (*_TENSOR_GROUPS, _PROVIDER_GROUP)
    }
    run["state"]["has"] = [g for g in _TENSOR_GROUPS if getattr(checkpoint.state, g) is not None]
    run_text = json.dumps(run)
    # The digest is written into the header once computed, while the tensors are written.
    metadata = {
        "sha256": _PENDING_DIGEST,
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "run": run_text,
    }
    target = directory / CHECKPOINT_FILE
    try:
        for stale in directory.glob(f".{CHECKPOINT_FILE}.*.tmp"):  # left by a killed write
            stale.unlink(missing_ok=True)
        _write_atomically(target, tensors, metadata, lambda: _digest(tensors, run_text))
    except OSError as exc:
        reason = _os_reason(exc)
        raise CheckpointError(f"cannot write checkpoint {str(target)!r}: {reason}") from None
    return target


_PENDING_DIGEST = "0" * 64
"""What the header holds in place of the digest until the digest is known (same length)."""

_HEADER_START = b'{"__metadata__":{"sha256":"'
"""How the safetensors header starts: the digest is at a fixed offset of the file."""


def _write_atomically(
    target: Path,
    tensors: dict[str, np.ndarray],
    metadata: dict[str, str],
    digest: Callable[[], str],
) -> None:
    """Write a safetensors file to a temporary name, fsync it, rename it over ``target``.

    ``digest()`` runs on a second thread while the file is written and synced (both mostly
    outside the GIL: hashing, writing large buffers and syncing release it), and its result
    then replaces the placeholder of ``metadata["sha256"]`` in the header, synced in turn.
    """
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    # os.open honours the umask: a checkpoint is as readable as any other file the user writes.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with ThreadPoolExecutor(1) as pool:
            computed = pool.submit(digest)
            _write_safetensors(fd, tensors, metadata)
            os.fsync(fd)  # the tensors go to the disk while the digest is still computed
            os.pwrite(fd, computed.result().encode("ascii"), 8 + len(_HEADER_START))
            os.fsync(fd)  # then the one block that holds the digest
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    previous = _hold(target)
    try:
        os.replace(tmp, target)
    except BaseException:
        if previous is not None:
            os.close(previous)
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    if previous is not None:
        _release_later(previous)


def _hold(target: Path) -> int | None:
    """An open descriptor of the checkpoint about to be replaced (None when there is none).

    While it is open, replacing the file does not free its blocks (tens of milliseconds for a
    large file); closing it later, on a background thread, does.
    """
    try:
        return os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


_releases: list[threading.Thread] = []
"""Replaced checkpoints whose blocks are being freed in the background."""


def _release_later(fd: int) -> None:
    """Close ``fd`` on a background thread (joined by :func:`checkpoint_lock` at the end of the
    run, and at interpreter exit)."""
    thread = threading.Thread(target=os.close, args=(fd,), name="aumai-fedtrain-release")
    thread.start()
    _releases[:] = [*(t for t in _releases if t.is_alive()), thread]


def _finish_releases() -> None:
    while _releases:
        _releases.pop().join()


def _write_safetensors(fd: int, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write ``tensors`` (C-ordered little-endian floats, :func:`~aumai_fedtrain.models.as_stored`)
    to ``fd`` in the safetensors layout.

    The layout (https://huggingface.co/docs/safetensors): an unsigned 64-bit little-endian
    header size, a JSON header (``__metadata__`` first, with ``sha256`` its first entry; then
    tensor name -> dtype, shape, byte range), space-padded to a multiple of 8 bytes, then the
    tensors' bytes. Written here rather than by ``safetensors.numpy.save_file``, which writes
    through its own hidden temporary file (left behind when the run is killed) with mode 0600,
    and would need the whole file in memory to write to a descriptor.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in sorted(tensors):
        end = offset + tensors[name].nbytes
        header[name] = {
            "dtype": stored_name(tensors[name].dtype),
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if not text.startswith(_HEADER_START):  # the digest's offset depends on it
        raise AssertionError("the checkpoint header must start with its digest")
    text += b" " * (-len(text) % 8)
    # Views of the tensors, no copies.
    views = [tensors[name].reshape(-1).data.cast("B") for name in sorted(tensors)]
    write_buffers(fd, [memoryview(len(text).to_bytes(8, "little")), memoryview(text), *views])


def _read(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason})") from None
    return metadata, tensors


def load_checkpoint(directory: str | Path) -> Checkpoint | None:
    """Read the checkpoint in ``directory``; None when there is none yet.

    Raises :class:`CheckpointError` (one line) for a corrupt file, one whose digest does not
    match its metadata or tensors, or one of another format or version.
    """
    path = Path(directory) / CHECKPOINT_FILE
    try:
        path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:  # e.g. the directory is a file, or cannot be searched
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {_os_reason(exc)}") from None
    metadata, tensors = _read(path)
    version = metadata.get("version")
    if metadata.get("format") != FORMAT_NAME or version not in (FORMAT_VERSION, _LEGACY_VERSION):
        raise CheckpointError(
            f"{path} is not a checkpoint this version of aumai-fedtrain reads (format "
            f"{metadata.get('format')!r}, version {version!r}; it reads "
            f"{FORMAT_NAME!r} versions {_LEGACY_VERSION} and {FORMAT_VERSION})"
        )
    run_text = metadata.get("run")
    if version == _LEGACY_VERSION:
        intact = _digest(tensors, None) == metadata.get("tensors_sha256")
    else:
        intact = isinstance(run_text, str) and _digest(tensors, run_text) == metadata.get("sha256")
    if not intact:
        raise CheckpointError(f"{path} is corrupt: its contents do not match their SHA-256")
    checkpoint = _parse(path, run_text, tensors)
    if version == _LEGACY_VERSION:
        checkpoint.provider_state = _provider_state_by_node_id(path, checkpoint)
    return checkpoint


def _parse(path: Path, run_text: str | None, tensors: dict[str, np.ndarray]) -> Checkpoint:
    try:
        run: dict[str, Any] = json.loads(run_text or "")
        state_fields = run["state"]
        order = run.pop("tensor_keys")
        for group in state_fields.pop("has"):
            state_fields[group] = _group(tensors, group, order[group])
        run["provider_state"] = _group(tensors, _PROVIDER_GROUP, order[_PROVIDER_GROUP])
        return Checkpoint.model_validate(run)
    except ValidationError as exc:
        reason = describe_validation_error(exc)
    except KeyError as exc:
        reason = f"missing {exc}"
    except (TypeError, AttributeError, json.JSONDecodeError) as exc:
        reason = str(exc)
    raise CheckpointError(f"{path} is corrupt: bad run metadata ({reason})")


def _group(tensors: dict[str, np.ndarray], group: str, keys: list[str]) -> TensorMap:
    return {key: tensors[f"{group}/{key}"] for key in keys}


def _provider_state_by_node_id(path: Path, checkpoint: Checkpoint) -> TensorMap:
    """Rename version 1's ``node/<position>/<tensor>`` provider tensors to node ids."""
    renamed = {}
    for name, value in checkpoint.provider_state.items():
        match = re.fullmatch(r"node/([0-9]+)/(.+)", name, flags=re.DOTALL)
        if match is not None:
            position = int(match[1])
            if position >= len(checkpoint.node_ids):
                raise CheckpointError(
                    f"{path} is corrupt: provider tensor {name!r} names node {position} "
                    f"of {len(checkpoint.node_ids)}"
                )
            name = f"node/{checkpoint.node_ids[position]}/{match[2]}"
        renamed[name] = value
    return renamed
