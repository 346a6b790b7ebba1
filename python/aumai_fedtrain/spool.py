"""Updates waiting for their turn in the streamed mean, kept on disk instead of in memory.

The streamed mean folds updates in node-list order, so an update that arrives before an
earlier node's waits. Beyond the coordinator's allowance for waiting updates
(``DiLoCoCoordinator(waiting_memory=...)``) they wait here: each update's gradients are written
as raw bytes to a file of a private directory (mode 0700, created on first use, removed by
:meth:`UpdateSpool.close`), their SHA-256 kept in memory, and read back (the digest checked)
when their turn comes. Only the gradients go to disk; the update's other fields stay in memory.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aumai_fedtrain.files import write_buffers
from aumai_fedtrain.models import LocalUpdate

__all__ = ["SpoolError", "SpooledUpdate", "UpdateSpool"]


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
    path: Path
    entries: tuple[_Entry, ...]
    sha256: bytes

    @property
    def node_id(self) -> str:
        return self.update.node_id


class UpdateSpool:
    """A private directory of waiting updates' gradients (see the module).

    Parameters
    ----------
    parent
        Where the directory is made; the system's temporary directory (``TMPDIR``) by default.
    """

    def __init__(self, parent: str | Path | None = None) -> None:
        self._parent = parent
        self._directory: Path | None = None
        self._count = 0

    def put(self, update: LocalUpdate) -> SpooledUpdate:
        """Write ``update``'s gradients to a new file; raises ``OSError`` (nothing left behind)."""
        if self._directory is None:
            self._directory = Path(
                tempfile.mkdtemp(prefix="aumai-fedtrain-waiting-", dir=self._parent)
            )
        self._count += 1
        path = self._directory / f"{self._count}.bin"
        arrays = [np.asarray(values, order="C") for values in update.gradients.values()]
        views = [array.reshape(-1).data.cast("B") for array in arrays]
        digest = hashlib.sha256()
        for view in views:
            digest.update(view)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            write_buffers(fd, views)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        entries = tuple(
            _Entry(key, array.dtype, array.shape)
            for key, array in zip(update.gradients, arrays, strict=True)
        )
        return SpooledUpdate(
            update.model_copy(update={"gradients": {}}), path, entries, digest.digest()
        )

    def take(self, spooled: SpooledUpdate) -> LocalUpdate:
        """Read ``spooled``'s gradients back and delete their file; :class:`SpoolError` when
        they are not what was written."""
        try:
            with spooled.path.open("rb", buffering=0) as handle:
                gradients = {entry.key: _read_array(handle, entry) for entry in spooled.entries}
                trailing = handle.read(1)
        except OSError as exc:
            raise SpoolError(f"its waiting copy {spooled.path} could not be read ({exc})") from None
        finally:
            spooled.path.unlink(missing_ok=True)
        digest = hashlib.sha256()
        for values in gradients.values():
            digest.update(values.reshape(-1).data.cast("B"))
        if trailing or digest.digest() != spooled.sha256:
            raise SpoolError(f"its waiting copy {spooled.path} changed on disk")
        return spooled.update.model_copy(update={"gradients": gradients})

    def close(self) -> None:
        """Remove the directory and whatever still waits in it."""
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None


def _read_array(handle: io.FileIO, entry: _Entry) -> np.ndarray:
    values = np.empty(entry.shape, dtype=entry.dtype)
    view = values.reshape(-1).data.cast("B")
    done = 0
    while done < len(view):
        read = handle.readinto(view[done:])
        if not read:
            raise SpoolError("the file is shorter than what was written")
        done += read
    return values
