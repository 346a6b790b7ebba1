"""Updates waiting for their turn in the streamed mean, kept on disk instead of in memory.

The streamed mean folds updates in node-list order, so an update that arrives before an
earlier node's waits. Beyond the coordinator's allowance for waiting updates
(``DiLoCoCoordinator(waiting_memory=...)``) they wait here: each update's gradients are
appended as raw bytes to one file per round, their SHA-256 kept in memory, and read back (the
digest checked) when their turn comes. The file is unlinked as soon as it is made (mode 0600):
nothing is visible in its directory, and the space returns to the file system when the spool
is closed or the process dies, killed or not. Only the gradients go to disk; the update's other
fields stay in memory.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
        arrays = [np.asarray(values, order="C") for values in update.gradients.values()]
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
            for key, array in zip(update.gradients, arrays, strict=True)
        )
        return SpooledUpdate(
            update.model_copy(update={"gradients": {}}), offset, entries, digest.digest()
        )

    def take(self, spooled: SpooledUpdate) -> LocalUpdate:
        """Read ``spooled``'s gradients back; :class:`SpoolError` when they cannot be read or
        are not what was written."""
        if self._fd is None:
            raise SpoolError("its waiting copy is gone: the spool was closed")
        gradients: dict[str, np.ndarray] = {}
        offset = spooled.offset
        digest = hashlib.sha256()
        try:
            for entry in spooled.entries:
                values = np.empty(entry.shape, dtype=entry.dtype)
                view = values.reshape(-1).data.cast("B")
                _read_into(self._fd, view, offset)
                digest.update(view)
                offset += len(view)
                gradients[entry.key] = values
        except OSError as exc:
            raise SpoolError(f"its waiting copy on disk could not be read ({exc})") from None
        if digest.digest() != spooled.sha256:
            raise SpoolError("its waiting copy changed on disk")
        return spooled.update.model_copy(update={"gradients": gradients})

    def close(self) -> None:
        """Close the file: the file system takes its space back."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _read_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` with the file's bytes from ``offset``."""
    done = 0
    while done < len(view):
        data = os.pread(fd, min(_READ_BYTES, len(view) - done), offset + done)
        if not data:
            raise OSError("the file is shorter than what was written")
        view[done : done + len(data)] = data
        done += len(data)
