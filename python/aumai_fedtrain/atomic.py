"""Files replaced atomically: a reader sees the old file or the new one, never a torn one."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["write_atomically"]


def write_atomically(out: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``out``, fsync it, rename it over ``out``.

    A failing or interrupted write leaves ``out`` as it was (or absent); the file is as
    readable as any other the user writes (the umask applies). Raises ``OSError``.
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with open(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return out
