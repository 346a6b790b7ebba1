"""Files: written atomically (a reader sees the old file or the new one, never a torn one), and
the header of a safetensors file."""

from __future__ import annotations

import errno
import json
import os
import secrets
from pathlib import Path
from typing import Any

__all__ = ["safetensors_header", "write_atomically", "write_buffers"]

_LENGTH_BYTES = 8

_IOV_MAX = 1024
"""Buffers per ``writev`` (POSIX guarantees at least 16; Linux takes 1,024)."""


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


def write_buffers(fd: int, buffers: list[memoryview]) -> None:
    """Write ``buffers`` to ``fd`` in order with a few ``writev`` calls, each outside the GIL,
    resuming after a short write. Raises ``OSError``."""
    index = 0
    while index < len(buffers):
        batch = buffers[index : index + _IOV_MAX]
        written = os.writev(fd, batch)
        if written == 0 and any(len(buffer) for buffer in batch):
            raise OSError(errno.EIO, "the file system accepted no bytes")
        for buffer in batch:
            if written < len(buffer):
                buffers[index] = buffer[written:]
                break
            written -= len(buffer)
            index += 1


def safetensors_header(source: bytes | str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (its bytes, or its path, of which only the header
    is read): tensor name -> dtype, shape, offsets, and ``__metadata__``.

    Raises ``ValueError`` for data that does not start with a safetensors header, ``OSError``
    for a file that cannot be read.
    """
    if isinstance(source, bytes):
        prefix = source
    else:
        with Path(source).open("rb") as handle:
            length = int.from_bytes(handle.read(_LENGTH_BYTES), "little")
            handle.seek(0)
            prefix = handle.read(_LENGTH_BYTES + min(length, 1 << 30))
    length = int.from_bytes(prefix[:_LENGTH_BYTES], "little")
    text = prefix[_LENGTH_BYTES : _LENGTH_BYTES + length]
    try:
        header = json.loads(text) if len(text) == length else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (no header)")
    return header
