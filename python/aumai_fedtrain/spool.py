"""Updates waiting for their turn in the streamed mean, kept on disk instead of in memory.

The streamed mean folds updates in node-list order, so an update that arrives before an
earlier node's waits. Beyond the coordinator's allowance for waiting updates
(``DiLoCoCoordinator(waiting_memory=...)``) they wait here: each update's gradients are
appended as raw bytes to one file per round, their SHA-256 kept in memory, and read back (the
digest checked) when their turn comes. The file is unlinked as soon as it is made (mode 0600):
nothing is visible in its directory, and the space returns to the file system when the spool
is closed or the process dies, killed or not. Only the gradients go to disk (an
:class:`~aumai_fedtrain.compression.EncodedUpdate`'s codes and scales, as they are: never its
decoded values); the update's other fields stay in memory.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from aumai_fedtrain.compression import EncodedUpdate
from aumai_fedtrain.files import write_buffers
from aumai_fedtrain.models import LocalUpdate

__all__ = ["SpoolError", "SpooledUpdate", "UpdateSpool"]

_READ_BYTES = 8 * 1024 * 1024
"""Bytes read back at a time (each read is copied into the update's arrays)."""


class SpoolError(OSError):
    """A spooled update could not be read back as it was written."""


@dataclass(frozen=True)
class _Entry:
    key: str
    dtype: np.dtype[np.generic]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SpooledUpdate:
    """An update whose gradients wait on disk: the update without them, and where they are."""

    update: LocalUpdate
    offset: int
    entries: tuple[_Entry, ...]
    sha256: bytes

    @property
    def node_id(self) -> str:
        return self.update.node_id


class UpdateSpool:
    """One round's waiting updates on disk (see the module); close it at the end of the round.

    Parameters
    ----------
    parent
        Where the (at once unlinked) file is made; the system's temporary directory
        (``TMPDIR``) by default.
    """

    def __init__(self, parent: str | Path | None = None) -> None:
        self._parent = parent
        self._fd: int | None = None
        self._end = 0

    def put(self, update: LocalUpdate) -> SpooledUpdate:
        """Append ``update``'s gradients to the file; raises ``OSError`` (the file as before)."""
        if self._fd is None:
            fd, name = tempfile.mkstemp(prefix="aumai-fedtrain-waiting-", dir=self._parent)
            os.unlink(name)
            self._fd = fd
        named = _arrays_of(update)
        arrays = [np.asarray(values, order="C") for _, values in named]
        views = [array.reshape(-1).data.cast("B") for array in arrays]
        digest = hashlib.sha256()
        for view in views:
            digest.update(view)
        offset = self._end
        try:
            write_buffers(self._fd, views)
        except BaseException:
            os.ftruncate(self._fd, offset)
            os.lseek(self._fd, offset, os.SEEK_SET)
            raise
        self._end = offset + sum(len(view) for view in views)
        entries = tuple(
            _Entry(key, array.dtype, array.shape)
            for (key, _), array in zip(named, arrays, strict=True)
        )
        return SpooledUpdate(_without_arrays(update), offset, entries, digest.digest())

    def take(self, spooled: SpooledUpdate) -> LocalUpdate:
        """Read ``spooled``'s gradients back; :class:`SpoolError` when they cannot be read or
        are not what was written."""
        if self._fd is None:
            raise SpoolError("its waiting copy is gone: the spool was closed")
        arrays: list[tuple[str, np.ndarray]] = []
        offset = spooled.offset
        digest = hashlib.sha256()
        try:
            for entry in spooled.entries:
                values = np.empty(entry.shape, dtype=entry.dtype)
                view = values.reshape(-1).data.cast("B")
                _read_into(self._fd, view, offset)
                digest.update(view)
                offset += len(view)
                arrays.append((entry.key, values))
        except OSError as exc:
            raise SpoolError(f"its waiting copy on disk could not be read ({exc})") from None
        if digest.digest() != spooled.sha256:
            raise SpoolError("its waiting copy changed on disk")
        return _with_arrays(spooled.update, arrays)

    def close(self) -> None:
        """Close the file: the file system takes its space back."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _arrays_of(update: LocalUpdate) -> list[tuple[str, np.ndarray]]:
    """The arrays that hold ``update``'s tensors, each with its key: an encoded update's
    codes (then scales, if any) of each tensor, else its gradients."""
    if not isinstance(update, EncodedUpdate):
        return list(update.gradients.items())
    named: list[tuple[str, np.ndarray]] = []
    for key, tensor in update.encoded.items():
        named.append((key, tensor.codes))
        if tensor.scales is not None:
            named.append((key, tensor.scales))
    return named


def _without_arrays(update: LocalUpdate) -> LocalUpdate:
    """``update`` without the arrays of :func:`_arrays_of` (an encoded update keeps each
    tensor's codec, shape and dtype, with empty codes and scales)."""
    if not isinstance(update, EncodedUpdate):
        return update.without_tensors()
    templates = {
        key: replace(
            tensor,
            codes=np.empty(0, tensor.codes.dtype),
            scales=None if tensor.scales is None else np.empty(0, tensor.scales.dtype),
        )
        for key, tensor in update.encoded.items()
    }
    return update.model_copy(update={"encoded": templates})


def _with_arrays(update: LocalUpdate, named: list[tuple[str, np.ndarray]]) -> LocalUpdate:
    """``update`` of :func:`_without_arrays` with the arrays of :func:`_arrays_of` back."""
    if not isinstance(update, EncodedUpdate):
        return update.model_copy(update={"gradients": dict(named)})
    given = (array for _, array in named)
    encoded = {
        key: replace(
            template,
            codes=next(given),
            scales=None if template.scales is None else next(given),
        )
        for key, template in update.encoded.items()
    }
    return update.model_copy(update={"encoded": encoded})


def _read_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` with the file's bytes from ``offset``."""
    done = 0
    while done < len(view):
        data = os.pread(fd, min(_READ_BYTES, len(view) - done), offset + done)
        if not data:
            raise OSError("the file is shorter than what was written")
        view[done : done + len(data)] = data
        done += len(data)
