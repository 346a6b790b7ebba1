"""Files replaced atomically: a reader sees the old file or the new one, never a torn one."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["replace_atomically"]


def replace_atomically(out: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)`` beside ``out``, fsync the file, rename it over ``out``.

    A failing or interrupted write leaves ``out`` as it was (or absent). Raises ``OSError``.
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(8)}.tmp")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(out.parent)
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
